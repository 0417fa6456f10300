"""The speed harness's noise verdict (benchmarks/speed/noise.py) and its summary lines."""

import importlib.util
import sys
from pathlib import Path

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed"


def _load(name):
    sys.path.insert(0, str(SPEED))
    try:
        spec = importlib.util.spec_from_file_location(f"speed_{name}", SPEED / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(SPEED))


noise = _load("noise")


def test_overlapping_ranges_are_within_noise():
    v = noise.verdict([0.70, 0.85, 0.61], [0.72, 0.66, 0.80])
    assert not v["beyond_noise"]
    assert "within noise" in v["text"]
    assert abs(v["ratio"] - 0.70 / 0.72) < 1e-12
    assert abs(v["lo"] - 0.61 / 0.80) < 1e-12 and abs(v["hi"] - 0.85 / 0.66) < 1e-12


def test_separated_ranges_are_beyond_noise_either_way():
    slower = noise.verdict([1.20, 1.25, 1.22], [1.00, 1.05, 1.02])
    faster = noise.verdict([1.00, 1.05, 1.02], [1.20, 1.25, 1.22])
    assert slower["beyond_noise"] and faster["beyond_noise"]
    assert slower["ratio"] > 1 > faster["ratio"]
    assert "beyond noise" in slower["text"]


def test_touching_ranges_and_single_repeats_are_within_noise():
    assert not noise.verdict([1.0, 1.1], [1.1, 1.2])["beyond_noise"]  # share 1.1
    assert not noise.verdict([1.0], [2.0])["beyond_noise"]  # no spread to judge
    assert noise.verdict([], [1.0])["ratio"] is None


def test_summary_reports_spread_and_verdict():
    run = _load("run")
    runs = []
    for rep, (fl, raw) in enumerate([(0.70, 0.50), (0.72, 0.52), (0.71, 0.51)]):
        for name, rs in (("flotilla", fl), ("raw", raw)):
            runs.append(
                dict(
                    framework=name,
                    repeat=rep,
                    wall_s=10 * rs,
                    cpu_s=9 * rs,
                    round_s_median=rs,
                    first_round_s=1.0,
                    peak_mb=100.0,
                    accuracy=0.6,
                    load1_before=1.0,
                    max_procs=1,
                )
            )
    text, med = run.summarise(runs, ["raw", "flotilla"])
    assert "0.710 [0.700-0.720]" in text  # flotilla's steady s/round: median [min-max]
    assert "beyond noise" in text.split("flotilla / raw")[1].splitlines()[0]
    assert med["flotilla"]["verdicts"]["raw"]["round_s"]["beyond_noise"]


def test_median_interval_matches_the_sign_test_order_statistics():
    import random

    assert noise.median_ci([1, 2, 3, 4, 5]) is None  # 5 values: even min..max has 2/32 > 5% chance
    assert noise.median_ci([6, 1, 5, 2, 4, 3]) == (1.0, 6.0)  # 6: min..max covers with 1 - 2/64
    vals = list(range(40))
    random.Random(0).shuffle(vals)
    assert noise.median_ci(vals) == (13.0, 26.0)  # the textbook 14th..27th of 40


def test_paired_verdict_needs_the_whole_interval_under_the_limit():
    tight = [0.97 + 0.001 * (i % 7) for i in range(40)]
    wide = [0.80 + 0.02 * (i % 20) for i in range(40)]  # median ~1.0 but spans 0.80-1.18
    slow = [1.10 + 0.001 * (i % 5) for i in range(40)]
    assert noise.paired_verdict(tight, 1.03)["at_most_limit"]
    w = noise.paired_verdict(wide, 1.03)
    assert not w["at_most_limit"] and not w["above_limit"] and "not resolved" in w["text"]
    s = noise.paired_verdict(slow, 1.03)
    assert s["above_limit"] and not s["at_most_limit"]
    assert not noise.paired_verdict([1.0, 1.0], 1.03)["at_most_limit"]  # too few pairs to say anything
