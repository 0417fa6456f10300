"""The FedBuff / Papaya comparison over several seeds: time and trips to the target, side by side.

    .venv/bin/python benchmarks/fleet_papaya_seeds.py docs/fleet docs/fleet/extra_sync_c1000 \
        docs/fleet/seeds/seed1 docs/fleet/seeds/seed1/extra_sync_c1000 docs/fleet/seeds/seed2 docs/fleet/seeds/seed2/extra_sync_c1000

Reads ``<task>_results.json`` from each folder (written by ``fleet_papaya.py --seed N --out DIR``;
folders of the same seed are merged, a run that reached the target replacing one that did not,
e.g. a follow-up with a larger trip budget) and prints, per task and concurrency, each seed's simulated time to the target for FedAvgM,
FedAsync and FedBuff and FedBuff's speed-up over the other two.  A run that missed the target
within its trip budget shows as ``>`` its simulated time (its ratio is then a lower bound).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ALGOS = ("fedavgm", "fedasync", "fedbuff")


def load(folder: Path, task: str) -> dict | None:
    path = folder / f"{task}_results.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return {"seed": doc["args"]["seed"], "runs": {(r["algo"], r["concurrency"]): r for r in doc["results"]}}


def time_of(run: dict) -> tuple[float, bool]:
    """(simulated seconds to the target, or to the end of the budget; whether the target was reached)."""
    return (run["time_to_target_s"], True) if run["reached"] else (run["sim_time_s"], False)


def fmt_time(t: float, reached: bool) -> str:
    return f"{t:,.0f}" if reached else f"> {t:,.0f}"


def ratio(other: dict | None, fedbuff: dict | None) -> tuple[str, float | None]:
    """FedBuff's speed-up over ``other`` (a lower bound if ``other`` missed the target)."""
    if other is None or fedbuff is None or not fedbuff["reached"]:
        return "n/a", None
    t, reached = time_of(other)
    r = t / fedbuff["time_to_target_s"]
    return (f"{r:.1f}x" if reached else f"> {r:.1f}x"), r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--tasks", nargs="+", default=["fashion", "shakespeare"])
    args = ap.parse_args()
    for task in args.tasks:
        by_seed: dict[int, dict] = {}
        for s in (load(f, task) for f in args.folders):
            if s is None:
                continue
            runs = by_seed.setdefault(s["seed"], {"seed": s["seed"], "runs": {}})["runs"]
            for key, run in s["runs"].items():
                if key not in runs or (run["reached"] and not runs[key]["reached"]):
                    runs[key] = run
        seeds = [by_seed[k] for k in sorted(by_seed)]
        if not seeds:
            continue
        print(f"\n#### {task}: simulated seconds to the target (seeds {', '.join(str(s['seed']) for s in seeds)})\n")
        print("| C | seed | FedAvgM | FedAsync | FedBuff | FedBuff vs FedAvgM | FedBuff vs FedAsync |")
        print("|---|---|---|---|---|---|---|")
        concurrencies = sorted({c for s in seeds for (_, c) in s["runs"]})
        summary = []
        for c in concurrencies:
            vs_sync, vs_async = [], []
            for s in seeds:
                runs = {a: s["runs"].get((a, c)) for a in ALGOS}
                cells = [fmt_time(*time_of(runs[a])) if runs[a] else "n/a" for a in ALGOS]
                (r1, x1), (r2, x2) = ratio(runs["fedavgm"], runs["fedbuff"]), ratio(runs["fedasync"], runs["fedbuff"])
                vs_sync.append(x1)
                vs_async.append(x2)
                print(f"| {c:,} | {s['seed']} | {' | '.join(cells)} | {r1} | {r2} |")
            med = lambda xs: (
                statistics.median([x for x in xs if x is not None]) if any(x is not None for x in xs) else None
            )  # noqa: E731
            summary.append((c, med(vs_sync), med(vs_async)))
        print(
            "\nmedian over seeds (lower bounds where a run missed the target): "
            + "; ".join(
                f"C={c:,}: {a:.1f}x vs FedAvgM, {b:.1f}x vs FedAsync"
                for c, a, b in summary
                if a is not None and b is not None
            )
        )


if __name__ == "__main__":
    main()
