"""Shakespeare half of pre-trained initialisation: the IID partition of the roles' windows, and
``flotilla pretrain`` on the proxy plays then ``init: {checkpoint}`` on the target plays, end to end
through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from flotilla.cli import main
from flotilla.config import ConfigError, validate
from flotilla.tasks import build_task

# Few, long roles and a tiny CharLSTM keep these tests fast.
SMALL = {"name": "shakespeare", "min_chars": 20000, "seq_len": 10, "model": {"embed_dim": 4, "hidden": 8}}


def _roles(data, windows: torch.Tensor) -> set[int]:
    """The roles (indices into text.names) the windows start in."""
    return set((np.searchsorted(data.text.offsets, windows.numpy(), side="right") - 1).tolist())


def test_shakespeare_iid_partition_shuffles_training_windows_across_roles():
    task = {**SMALL, "plays": "target", "max_train_samples_per_client": 40}
    natural = build_task(validate({"task": task, "rounds": 1}).task, 0).dataset
    iid = build_task(validate({"task": {**task, "partition": "iid"}, "rounds": 1}).task, 0).dataset
    assert iid.client_names == natural.client_names and natural.num_clients > 5
    assert [len(i) for i in iid.train_indices] == [len(i) for i in natural.train_indices]
    assert all(torch.equal(a, b) for a, b in zip(iid.test_indices, natural.test_indices, strict=True))
    pooled = lambda d: torch.cat(d.train_indices).sort().values  # noqa: E731
    assert torch.equal(pooled(iid), pooled(natural))  # the same windows, dealt differently
    assert all(len(_roles(natural, w)) == 1 for w in natural.train_indices)  # natural: one role a client
    assert np.mean([len(_roles(iid, w)) for w in iid.train_indices]) > 5  # iid: many roles a client
    again = build_task(validate({"task": {**task, "partition": "iid"}, "rounds": 1}).task, 0).dataset
    assert all(torch.equal(a, b) for a, b in zip(again.train_indices, iid.train_indices, strict=True))
    with pytest.raises(ConfigError, match="task.partition"):
        validate({"task": {**task, "partition": "dirichlet"}, "rounds": 1})


def test_pretrain_on_proxy_plays_then_init_a_target_run(tmp_path, capsys):
    ckpt = tmp_path / "proxy.safetensors"
    pre = {"task": {**SMALL, "plays": "proxy"}, "epochs": 1, "lr": 1.0, "momentum": 0.0, "threads": 1}
    pre |= {"max_examples": 300, "max_test_examples": 200, "output": str(ckpt)}
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))
    assert main(["pretrain", str(tmp_path / "pre.yaml")]) == 0
    assert "test accuracy" in capsys.readouterr().out and ckpt.is_file()
    from safetensors import safe_open
    from safetensors.torch import load_file

    saved = load_file(str(ckpt))
    assert {"embed.weight", "lstm.weight_ih_l0", "head.weight"} <= set(saved)
    with safe_open(str(ckpt), "pt") as f:
        assert yaml.safe_load(f.metadata()["task"])["plays"] == "proxy"
    # a federated run on the target plays starts from it (one step at a vanishing lr keeps it)
    run = {"task": {**SMALL, "plays": "target", "max_train_samples_per_client": 20}, "rounds": 1, "cohort": 2}
    run |= {"client": {"steps": 1, "lr": 1e-12}, "init": {"checkpoint": str(ckpt)}, "threads": 1}
    run |= {"eval": {"max_clients": 2}, "output": {"progress": False, "plot": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["run", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    assert f"init: loaded {len(saved)} tensors from {ckpt}" in capsys.readouterr().err
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    for name, tensor in saved.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-9, rtol=0)
    # a target model of another width: one line naming the LSTM tensors, no run directory
    run["task"]["model"] = {"embed_dim": 4, "hidden": 16}
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(run))
    assert main(["run", str(tmp_path / "wide.yaml"), "--run-dir", str(tmp_path / "wide")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit the task's model" in err and "lstm.weight_hh_l0: model [64, 16] vs checkpoint [32, 8]" in err
    assert "\n" not in err and not (tmp_path / "wide").exists()
