"""End to end on the real data sets (small budgets so the suite stays fast)."""

from flotilla.api import run_experiment
from flotilla.config import validate
from flotilla.data.shakespeare import most_frequent_char_accuracy


def test_fashion_mnist_dirichlet_learns_well_above_chance(tmp_path):
    cfg = validate(
        {
            "task": {"name": "fashion-mnist", "partition": "dirichlet", "alpha": 0.5, "num_clients": 100},
            "rounds": 4,
            "cohort": 10,
            "client": {"epochs": 1, "batch_size": 20, "lr": 0.05},
            "server": {"optimizer": "fedavg"},
            "eval": {"every": 4},
            "output": {"progress": False},
        }
    )
    result = run_experiment(cfg, run_dir=tmp_path / "fm")
    acc = result.history[-1]["accuracy"]
    assert acc > 0.5, acc  # 10 classes: chance is 0.1
    assert result.history[-1]["eval_examples"] == 10000  # every test image belongs to some client


def test_shakespeare_beats_most_frequent_character(tmp_path):
    cfg = validate(
        {
            "task": {"name": "shakespeare", "max_clients": 200, "model": {"hidden": 64}},
            "rounds": 12,
            "cohort": 5,
            "client": {"steps": 15, "batch_size": 32, "lr": 1.0},
            "eval": {"every": 12, "max_clients": 20},
            "output": {"progress": False},
        }
    )
    result = run_experiment(cfg, run_dir=tmp_path / "shk")
    from flotilla.data.shakespeare import shakespeare_federated

    baseline = most_frequent_char_accuracy(shakespeare_federated(max_clients=200))
    acc = result.history[-1]["accuracy"]
    assert acc > baseline + 0.04, (acc, baseline)
