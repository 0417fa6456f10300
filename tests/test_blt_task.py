"""The shakespeare-bytes task (issue 17): one federated round through run_experiment, per-byte
evaluation, and a serve + join round where the device patches its own bytes."""

from __future__ import annotations

import math

import pytest
import torch

import flotilla.blt.entropy as E
from flotilla.config import validate
from flotilla.experiment.run import run_experiment
from flotilla.tasks import build_task

TINY = {
    "name": "shakespeare-bytes",
    "seq_len": 32,
    "max_clients": 3,
    "max_train_windows_per_client": 4,
    "model": {
        "name": "blt",
        "local_dim": 16,
        "global_dim": 16,
        "heads": 2,
        "window": 8,
        "hash_ns": [3],
        "hash_table": 64,
        "target_patch_size": 3.0,
        "entropy": {"dim": 16, "layers": 1, "window": 8, "steps": 2},
    },
}


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    """The entropy checkpoint in a private folder (trained there, 2 steps); the parsed plays stay shared."""
    monkeypatch.setattr(E, "cache_dir", lambda: tmp_path / "cache")
    return tmp_path


def _cfg(tmp_path, **over):
    return validate(
        {
            "seed": 0,
            "task": TINY,
            "rounds": 1,
            "cohort": 2,
            "threads": 1,
            "client": {"steps": 2, "batch_size": 2, "lr": 0.1},
            "eval": {"every": 1, "max_clients": 2, "batch_size": 8},
            "output": {"progress": False, "dir": str(tmp_path / "runs")},
            **over,
        }
    )


def test_one_federated_round_scores_every_test_byte(tiny_cache, capsys):
    cfg = _cfg(tiny_cache)
    task = build_task(cfg.task, cfg.seed)
    assert "training the BLT entropy model" in capsys.readouterr().err  # trained on first use, with a line
    assert E.checkpoint_path(E.EntropySpec(16, 1, 4, 8, steps=2, batch_size=16)).exists()
    ds = task.dataset
    assert ds.num_clients == 3 and all(ds.num_train(c) == 4 for c in range(3))
    x, y = ds.fetch(ds.train_indices[0][:2])
    assert x.shape == y.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])
    xt, yt = ds.fetch_test(ds.test_indices[0][:2])
    assert xt.shape == (2, 1, 32) and yt.shape == (64,)
    names = set(ds.client_names)
    from flotilla.blt.data import PROXY_PLAYS, load_role_bytes

    text = load_role_bytes()
    assert not any(text.plays[text.names.index(n)] in PROXY_PLAYS for n in names)
    before = torch.cat([p.detach().flatten().clone() for p in task.model.parameters() if p.requires_grad])
    result = run_experiment(cfg, task=task, write_run_dir=False)
    rec = result.history[-1]
    from flotilla.core.evaluate import eval_clients

    clients = eval_clients(ds, 2, cfg.seed)
    assert rec["eval_examples"] == sum(ds.num_test(c) for c in clients) * 32  # counted per byte
    assert 0 < rec["loss"] < math.log(260) + 0.5 and 0 <= rec["accuracy"] <= 1
    assert not torch.equal(result.weights, before)


def test_a_test_fraction_between_percentages_is_refused_naming_the_key(tmp_path):
    from flotilla.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="task.test_fraction") as e:
        validate({"task": {**TINY, "test_fraction": 0.155}, "rounds": 1})
    assert "whole percentage" in str(e.value)


def test_heldout_roles_are_outside_the_population(tiny_cache):
    from flotilla.tasks.shakespeare_bytes import build_data, heldout_roles

    cfg = _cfg(tiny_cache).task.model_copy(update={"max_clients": None})
    held = heldout_roles(cfg)
    train = build_data(cfg, 0)
    assert held.num_clients > 10 and not set(held.client_names) & set(train.client_names)
    assert all(held.num_train(c) == 0 and held.num_test(c) > 0 for c in range(held.num_clients))


def test_serve_and_join_one_round_with_patching_on_the_device(tiny_cache):
    from flotilla.network.client import Device, load_device_data, model_for_task, save_device_data
    from tests.network_helpers import PKI, start_server

    cfg = _cfg(tiny_cache)
    task = build_task(cfg.task, cfg.seed)
    x, y = task.dataset.fetch(task.dataset.train_indices[0])
    save_device_data(tiny_cache / "client0.safetensors", x, y)  # what export_clients writes for join
    pki = PKI(tiny_cache / "pki", devices=1)
    announced = cfg.task.model_dump(mode="json")
    with start_server(
        pki, tiny_cache / "state", model_for_task(announced), cohort=1, total_steps=1, task=announced
    ) as st:
        device = Device(
            f"localhost:{st.port}",
            pki.token(0),
            model_for_task,
            load_device_data(tiny_cache / "client0.safetensors"),
            ca=pki.ca,
            max_tasks=1,
        )
        report = device.run()
    assert len(report.accepted) == 1 and not report.refused
    assert device._model.patching == "entropy" and device._model.entropy_model is not None
