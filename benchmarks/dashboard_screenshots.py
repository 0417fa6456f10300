"""Screenshots of the dashboard for docs/dashboard.md, from real runs (a few minutes on 2 cores).

    python benchmarks/dashboard_screenshots.py [--out docs/dashboard]

Runs three small Fashion-MNIST experiments into a temporary folder while the dashboard serves it:
FedBuff on a simulated fleet, FedAvg with user-level DP, and FedAvgM with secure aggregation
(SecAgg+, simulated dropouts); a headless Chromium (Debian's) saves the page once they finish.
The deployment view's screenshot comes from the browser test:

    FLOTILLA_SCREENSHOTS=docs/dashboard pytest tests/test_dashboard.py -k deployment
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from flotilla.config import validate
from flotilla.dashboard.app import build_app
from flotilla.dashboard.serve import DashboardThread, bind
from flotilla.experiment.run import run_experiment

TASK = {"name": "fashion-mnist", "partition": "dirichlet", "num_clients": 200, "alpha": 0.5, "examples_per_client": 40}
COMMON = {"seed": 0, "task": TASK, "threads": 1, "client": {"epochs": 1, "batch_size": 10, "lr": 0.05}}
RUNS = {
    "fedbuff-fleet": {
        **COMMON,
        "mode": "async",
        "rounds": 30,
        "server": {"optimizer": "fedavg", "lr": 1.0},
        "fleet": {"population": 100000, "speed": {"dist": "lognormal", "median": 10, "sigma": 1.0}},
        "async": {"algorithm": "fedbuff", "concurrency": 50, "buffer_size": 10},
        "eval": {"every": 5, "max_clients": 50},
    },
    "dp-fedavg": {
        **COMMON,
        "rounds": 15,
        "cohort": 20,
        "server": {"optimizer": "fedavg", "lr": 1.0},
        "privacy": {"user_level": {"clip_norm": 0.5, "target_epsilon": 4.0, "sampling": "poisson"}},
        "eval": {"every": 3, "max_clients": 50},
    },
    "secagg-fedavgm": {
        **COMMON,
        "rounds": 12,
        "cohort": 20,
        "server": {"optimizer": "fedavgm", "lr": 1.0, "momentum": 0.9},
        "secure_aggregation": {"degree": "auto", "clip": 1.0, "dropout": {"mask": 0.05, "unmask": 0.05}},
        "eval": {"every": 2, "max_clients": 50},
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/dashboard", help="folder for the PNGs")
    p.add_argument("--runs", help="keep the runs in this folder; runs already there are not trained again")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from selenium import webdriver

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs) if args.runs else Path(tmp) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        dash = DashboardThread(build_app(runs_dir=runs), bind("127.0.0.1", 0))
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,2600"):
            opts.add_argument(a)
        driver = webdriver.Chrome(
            options=opts, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
        )
        try:
            driver.get(f"http://127.0.0.1:{dash.port}/")
            for name, raw in RUNS.items():
                if (runs / name / "model.safetensors").exists():
                    continue
                t = time.perf_counter()
                result = run_experiment(validate({**raw, "output": {"progress": False}}), run_dir=runs / name)
                last = result.history[-1]
                print(f"{name}: {time.perf_counter() - t:.0f} s, accuracy {last.get('accuracy')}")
            time.sleep(3)  # the page's next poll and redraw
            driver.save_screenshot(str(out / "dashboard-runs.png"))
            driver.find_element("id", "xaxis").send_keys("simulated time (s)")
            time.sleep(1)
            driver.save_screenshot(str(out / "dashboard-runs-simtime.png"))
            print(f"wrote {out / 'dashboard-runs.png'} and {out / 'dashboard-runs-simtime.png'}")
        finally:
            driver.quit()
            dash.stop()


if __name__ == "__main__":
    main()
