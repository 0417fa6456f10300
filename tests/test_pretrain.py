"""Pre-trained initialisation: flotilla pretrain's checkpoint, init: {checkpoint} (full, partial,
mismatch), the Hessian's top eigenvalue, heterogeneous local epochs, the proxy tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flotilla.config import ConfigError, validate
from flotilla.core.client import ClientSpec, local_epochs
from flotilla.experiment.init import InitError, load_init
from flotilla.experiment.pretrain import top_hessian_eigenvalue, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Net(torch.nn.Module):
    def __init__(self, hidden: int = 4, classes: int = 2):
        super().__init__()
        self.body = torch.nn.Linear(2, hidden)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def blobs(seed: int, hidden: int = 4, classes: int = 2):
    """6 clients of 2-D blobs and a small MLP (the task of the pretrain and init tests)."""
    g = torch.Generator().manual_seed(99)
    data = {}
    for c in range(6):
        y = torch.randint(0, 2, (20,), generator=g)
        x = torch.randn(20, 2, generator=g) + 2.0 * y[:, None].float() - 1.0
        data[f"c{c}"] = torch.utils.data.TensorDataset(x, y)
    trains = {k: torch.utils.data.Subset(v, range(14)) for k, v in data.items()}
    tests = {k: torch.utils.data.Subset(v, range(14, 20)) for k, v in data.items()}
    return {"model": Net(hidden, classes), "data": (trains, tests)}


def _task(**options):
    return {"name": "python", "factory": "tests.test_pretrain:blobs", "options": options}


def test_pretrain_writes_a_checkpoint_an_experiment_starts_from(tmp_path, monkeypatch):
    from flotilla.experiment.pretrain import PretrainConfig, pretrain
    from flotilla.experiment.run import run_experiment

    monkeypatch.chdir(ROOT)
    ckpt = tmp_path / "pre" / "blobs.safetensors"
    out = pretrain(
        PretrainConfig.model_validate({"task": _task(), "epochs": 3, "lr": 0.1, "output": str(ckpt)}),
        echo=lambda *_: None,
    )
    assert ckpt.is_file() and out["test_accuracy"] > 0.8 and not list(ckpt.parent.glob("*.tmp"))
    from safetensors.torch import load_file

    saved = load_file(str(ckpt))
    assert set(saved) == {"body.weight", "body.bias", "head.weight", "head.bias"}
    # an experiment with init: starts from exactly these weights (one local step at a vanishing lr)
    cfg = validate(
        {
            "task": _task(),
            "rounds": 1,
            "cohort": 2,
            "client": {"steps": 1, "lr": 1e-12},
            "init": {"checkpoint": str(ckpt)},
            "output": {"progress": False, "plot": False},
        }
    )
    result = run_experiment(cfg, run_dir=tmp_path / "run")
    for name, p in result.model.named_parameters():
        torch.testing.assert_close(p.detach(), saved[name], atol=1e-9, rtol=0)
    assert result.history[-1]["accuracy"] > 0.8  # no training to speak of: the checkpoint's accuracy


def test_init_partial_reports_and_mismatch_names_tensors(tmp_path):
    ckpt = tmp_path / "ten_classes.safetensors"
    torch.manual_seed(0)
    source = Net(classes=10)
    write_checkpoint(source, ckpt)
    model = Net(classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InitError) as e:
        load_init(model, ckpt)
    msg = str(e.value)
    assert "head.weight: model [2, 4] vs checkpoint [10, 4]" in msg and "head.bias" in msg and "\n" not in msg
    assert "body.weight" not in msg
    for k, v in model.state_dict().items():  # nothing half-loaded
        assert torch.equal(v, before[k])
    report = load_init(model, ckpt, partial=True)
    assert report.loaded == ["body.weight", "body.bias"] and report.kept == ["head.weight", "head.bias"]
    assert "kept as initialised: head.weight, head.bias" in report.summary()
    assert torch.equal(model.body.weight, source.body.weight) and torch.equal(model.head.weight, before["head.weight"])


def test_init_refusals(tmp_path):
    with pytest.raises(InitError, match="not found"):
        load_init(Net(), tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(InitError, match="not a readable safetensors file"):
        load_init(Net(), bad)
    other = tmp_path / "other.safetensors"
    write_checkpoint(torch.nn.Linear(3, 3), other)
    with pytest.raises(InitError, match="no tensor matching"):
        load_init(Net(), other, partial=True)
    with pytest.raises(ConfigError, match="init.partal: unknown key"):
        validate({"task": _task(), "rounds": 1, "init": {"checkpoint": "x", "partal": True}})


def test_init_mismatch_in_an_experiment_writes_no_run(tmp_path, monkeypatch):
    from flotilla.experiment.run import run_experiment

    monkeypatch.chdir(ROOT)
    ckpt = tmp_path / "wide.safetensors"
    write_checkpoint(Net(hidden=8), ckpt)
    cfg = validate({"task": _task(), "rounds": 1, "cohort": 2, "init": {"checkpoint": str(ckpt)}})
    with pytest.raises(InitError, match="body.weight: model \\[4, 2\\] vs checkpoint \\[8, 2\\]"):
        run_experiment(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


class Quadratic(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return self.w


def test_top_hessian_eigenvalue_of_a_quadratic():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    eig = torch.tensor([7.0, 3.0, -2.0, 1.0, 0.5], dtype=torch.float64)
    a = (q * eig) @ q.T  # known eigenvalues, a random basis

    def loss(w, _y):
        return 0.5 * w.double() @ a @ w.double()

    batch = [(torch.zeros(1), torch.zeros(1))]
    top = top_hessian_eigenvalue(Quadratic(5), loss, batch, iters=200, tol=1e-10)
    assert top == pytest.approx(7.0, rel=1e-4)
    scaled = top_hessian_eigenvalue(Quadratic(5), lambda w, y: 3 * loss(w, y), batch, iters=200, tol=1e-10)
    assert scaled == pytest.approx(21.0, rel=1e-4)


def test_heterogeneous_epochs_draws():
    spec = ClientSpec(epochs=1, heterogeneous_epochs=(0.3, 1, 5))
    draws = np.array([local_epochs(spec, s) for s in range(3000)])
    assert set(draws.tolist()) <= {1, 2, 3, 4, 5}
    # 30% draw uniformly from 1..5, the rest keep 1 epoch: P(epochs > 1) = 0.3 x 4/5
    assert abs((draws > 1).mean() - 0.24) < 0.03
    assert [local_epochs(spec, s) for s in range(50)] == draws[:50].tolist()  # a function of the seed
    assert local_epochs(ClientSpec(epochs=2), 5) == 2
    cfg = validate(
        {"task": _task(), "rounds": 1, "client": {"heterogeneous_epochs": {"fraction": 0.3, "min": 1, "max": 5}}}
    )
    from flotilla.experiment.specs import client_spec

    assert client_spec(cfg).heterogeneous_epochs == (0.3, 1, 5)
    with pytest.raises(ConfigError, match="client.heterogeneous_epochs: min: 4 is larger than max: 2"):
        validate({"task": _task(), "rounds": 1, "client": {"heterogeneous_epochs": {"min": 4, "max": 2}}})
    with pytest.raises(ConfigError, match="heterogeneous_epochs: draws local epochs, but client.steps"):
        validate({"task": _task(), "rounds": 1, "client": {"steps": 3, "heterogeneous_epochs": {}}})


def test_proxy_tasks_split_by_play_and_mnist_5k():
    from flotilla.tasks import build_task
    from flotilla.tasks.shakespeare import PROXY_PLAYS

    base = {"name": "shakespeare", "min_chars": 20000}
    proxy = build_task(validate({"task": {**base, "plays": "proxy"}, "rounds": 1, "cohort": 1}).task, 0)
    target = build_task(validate({"task": {**base, "plays": "target"}, "rounds": 1, "cohort": 1}).task, 0)
    every = build_task(validate({"task": base, "rounds": 1, "cohort": 1}).task, 0)
    plays = lambda d: {n.rsplit("/", 1)[0] for n in d.client_names}  # noqa: E731
    assert plays(proxy.dataset) <= PROXY_PLAYS and not plays(target.dataset) & PROXY_PLAYS
    assert sorted(proxy.dataset.client_names + target.dataset.client_names) == sorted(every.dataset.client_names)
    mnist = build_task(validate({"task": {"name": "mnist-5k", "num_clients": 10}, "rounds": 1}).task, 0)
    assert sum(mnist.dataset.num_train(c) for c in range(10)) == 4000
    assert sum(mnist.dataset.num_test(c) for c in range(10)) == 1000
    x, y = mnist.dataset.fetch(mnist.dataset.train_indices[0][:5])
    assert x.shape == (5, 1, 28, 28) and y.dtype == torch.int64
    assert yaml.safe_load(yaml.safe_dump(validate({"task": {"name": "mnist-5k"}, "rounds": 1}).model_dump(mode="json")))
