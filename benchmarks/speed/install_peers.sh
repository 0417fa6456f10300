#!/usr/bin/env bash
# Install the peer frameworks into their own venvs under benchmarks/.peers/ (git-ignored).
# Usage: bash benchmarks/speed/install_peers.sh [flower] [pfl]
# torch==2.13.0 is installed with --no-deps (the CPU wheel on this machine) plus its own
# pure-Python deps by hand, so that neither flwr nor pfl can pull in a CUDA torch.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PEERS="$HERE/../.peers"
PY="${PYTHON:-python3}"
mkdir -p "$PEERS"
peers=("$@"); [ ${#peers[@]} -eq 0 ] && peers=(flower pfl)
for p in "${peers[@]}"; do
  V="$PEERS/$p"
  if [ -f "$V/.ok" ]; then echo "[$p] already installed in $V"; continue; fi
  echo "[$p] creating $V"
  "$PY" -m venv "$V"
  "$V/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  "$V/bin/pip" install -q torch==2.13.0 --no-deps
  "$V/bin/pip" install -q filelock typing-extensions sympy networkx jinja2 fsspec "setuptools>=77" numpy psutil
  case "$p" in
    flower) "$V/bin/pip" install -q "flwr[simulation]" ;;
    pfl) "$V/bin/pip" install -q pfl ;;
    *) echo "unknown peer $p"; exit 2 ;;
  esac
  "$V/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('torch', torch.__version__)"
  touch "$V/.ok"
  echo "[$p] ok"
done
