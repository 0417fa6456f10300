"""CI smoke test of the speed harness: Flotilla (1 and 2 workers) and the bare loop, no peers.

    .venv/bin/python benchmarks/speed/smoke.py [--out DIR]

Runs run.py end to end on a tiny scale workload (1,000 on-demand synthetic users, cohort 50,
2 rounds, one repeat): separate processes, process-tree memory, the table, the JSON file.
Fails (exit 1) if a run fails, or if Flotilla with one worker and the bare loop do not end
with bit-identical weights (they perform exactly the same SGD steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def smoke(out: Path) -> dict:
    rc = run.main(
        [
            "--workload",
            "scale",
            "--users",
            "1000",
            "--rounds",
            "2",
            "--repeats",
            "1",
            "--frameworks",
            "raw,flotilla,flotilla-w2",
            "--timeout",
            "120",
            "--out",
            str(out),
        ]
    )
    runs = {r["framework"]: r for r in json.loads((out / "speed-scale.json").read_text())["runs"]}
    problems = [f"{n}: {r['error']}" for n, r in runs.items() if "error" in r]
    if rc != 0 or problems:
        raise SystemExit(f"smoke: runs failed: {problems or rc}")
    if runs["raw"]["weights_sha"] != runs["flotilla"]["weights_sha"]:
        raise SystemExit("smoke: Flotilla (1 worker) and the bare loop ended with different weights")
    return runs


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        smoke(Path(a.out or tmp))
    print("smoke ok")
