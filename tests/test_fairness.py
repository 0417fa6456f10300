"""Fairness across device tiers (issue 15): MDAC, per-tier metrics in runs, `flotilla report`."""

import json

import matplotlib
import pytest
import torch
from torch import nn

import flotilla
from flotilla.fairness.mdac import mdac, relative_changes, tier_values
from flotilla.runs.plot import figure_runs
from flotilla.runs.report import report
from tests.helpers import synthetic_dataset


def test_mdac_by_hand():
    base = {"low": 0.50, "mid": 0.60, "high": 0.80}
    opt = {"low": 0.40, "mid": 0.60, "high": 0.88}
    r = relative_changes(opt, base)
    assert r == pytest.approx({"low": -0.2, "mid": 0.0, "high": 0.1})
    assert mdac(r) == pytest.approx(0.3)  # |(-0.2) - 0.1|
    assert mdac({"low": 0.05, "mid": 0.05, "high": 0.05}) == 0.0  # every tier changes alike: fair
    with pytest.raises(ValueError, match="at least two tiers"):
        mdac({"low": 0.1})
    with pytest.raises(ValueError, match="tier low: the metric without the optimisation is 0"):
        relative_changes({"low": 0.1}, {"low": 0.0})
    assert tier_values({"tier_low_auc": 0.7, "tier_high_auc": 0.9, "auc": 0.8}, "auc") == {"low": 0.7, "high": 0.9}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _train(run_dir, **tiers):
    return flotilla.train(
        _mlp(),
        synthetic_dataset(num_clients=9),
        rounds=2,
        cohort=3,
        run_dir=run_dir,
        client={"lr": 0.3, "batch_size": 5},
        tiers={"assignment": "random", **tiers},
    )


def test_runs_record_per_tier_metrics_and_report_shows_mdac(tmp_path, monkeypatch):
    monkeypatch.setattr("flotilla.runs.plot.plot_runs", lambda *a, **k: None)  # each run's own plot.png: slow
    base = _train(tmp_path / "base")
    last = base.history[-1]
    for t in ("low", "mid", "high"):
        assert 0 <= last[f"tier_{t}_accuracy"] <= 1 and last[f"tier_{t}_loss"] > 0
    # the three tiers pool exactly the run's test examples: their example-weighted accuracy is the overall one
    assert sum(last[f"tier_{t}_accuracy"] for t in ("low", "mid", "high")) / 3 == pytest.approx(last["accuracy"])
    _train(tmp_path / "excl", exclude_low=True)
    _train(tmp_path / "narrow", heterofl_width={"low": 0.25, "mid": 0.5})
    monkeypatch.undo()
    text = report([tmp_path / "base", tmp_path / "excl", tmp_path / "narrow"], tmp_path / "r.png")
    assert "per tier (last evaluation)" in text and "MDAC" in text
    fair = text.split("MDAC = max |r_i - r_j|\n")[1].splitlines()
    rows = [line.split() for line in fair[2:]]
    assert {r[0] for r in rows} == {"excl", "narrow"} and all(r[1] == "base" for r in rows)
    # the MDAC column recomputed from the runs' own metrics
    recs = {
        n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("base", "excl")
    }
    want = mdac(relative_changes(tier_values(recs["excl"][-1], "accuracy"), tier_values(recs["base"][-1], "accuracy")))
    acc_row = next(r for r in rows if r[0] == "excl" and r[4] == "accuracy")
    assert float(acc_row[-1]) == pytest.approx(want, abs=1e-4)
    assert (tmp_path / "r.png").stat().st_size > 0


def test_exclude_low_trains_no_low_tier_client(tmp_path):
    # lr 0 would hide it; instead: with exclude_low the low tier's clients never appear in a cohort
    from flotilla.fairness.select import TierSampler
    from flotilla.fairness.tiers import assign_random

    tier = assign_random(9)
    seen = set()
    for r in range(20):
        seen |= set(TierSampler(tier, exclude_low=True)(0, r, 9, 3).tolist())
    assert seen == {1, 2, 4, 5, 7, 8}


def test_report_plot_gives_each_run_one_colour_in_every_panel():
    recs = lambda k: [  # noqa: E731
        {
            "round": r,
            "accuracy": 0.1 * r * k,
            "loss": 1 / r,
            "train_loss": 1.1 / r,
            "tier_low_accuracy": 0.1 * r,
            "tier_mid_accuracy": 0.2,
            "tier_high_accuracy": 0.3 * k,
        }
        for r in (1, 2, 3)
    ]
    fig = figure_runs({"a": recs(1), "b": recs(2), "c": recs(3)})
    colours = {}
    panels = 0
    for ax in fig.axes:
        for line in ax.get_lines():
            run = line.get_label().split(" ")[0]
            colours.setdefault(run, set()).add(matplotlib.colors.to_hex(line.get_color()))
        panels += bool(ax.get_lines())
    matplotlib.pyplot.close(fig)
    assert panels == 5  # accuracy, loss and the three tiers
    assert set(colours) == {"a", "b", "c"}
    assert all(len(c) == 1 for c in colours.values())  # one colour per run everywhere
    assert len({next(iter(c)) for c in colours.values()}) == 3  # and different runs differ
