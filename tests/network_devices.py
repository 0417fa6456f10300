"""Start many ``flotilla join`` device processes cheaply: import once, then fork one child per device.

    python tests/network_devices.py OUT_DIR HOST:PORT CA.pem TOKEN=DATA [TOKEN=DATA ...]

Each child is a separate OS process running exactly ``flotilla join --server HOST:PORT --token
TOKEN --data DATA --ca CA.pem`` (its stdout/stderr in OUT_DIR/device<i>.out/.err); forking after
the imports saves each of them the ~2 s of CPU that importing torch costs.  No gRPC channel or
torch thread exists in the parent before the forks.  The parent prints one JSON line of exit
codes when every child has ended, and exits non-zero if any child did.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The heavy imports, done once before forking.  Nothing runs a torch op here: a thread pool
# started before fork() would be unusable in the children.
from flotilla.cli import main as flotilla_main  # noqa: E402
from flotilla.network.client import Device  # noqa: E402,F401
from flotilla.tasks import TaskConfig  # noqa: E402,F401  (imported by model_for_task)
from flotilla.tasks.models import SmallCNN  # noqa: E402,F401  (imported by model_for_task)


def run() -> int:
    out, server, ca, *pairs = sys.argv[1:]
    children = {}
    for i, pair in enumerate(pairs):
        token, data = pair.split("=", 1)
        pid = os.fork()
        if pid == 0:
            for fd, name in ((1, f"device{i}.out"), (2, f"device{i}.err")):
                f = os.open(os.path.join(out, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            try:
                rc = flotilla_main(["join", f"--server={server}", f"--token={token}", f"--data={data}", f"--ca={ca}"])
            except BaseException as e:  # noqa: BLE001 - report and exit the child, never return to the loop
                print(f"device {i}: {e!r}", file=sys.stderr)
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        children[pid] = i
    codes = {}
    while children:
        pid, status = os.wait()
        codes[children.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps({str(i): codes[i] for i in sorted(codes)}), flush=True)
    return 1 if any(codes.values()) else 0


if __name__ == "__main__":
    sys.exit(run())
