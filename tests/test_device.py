"""device: cpu | cuda | auto.  Runs on a CPU-only machine: "a GPU is there" is simulated by
patching torch.cuda.is_available where only the decision (not a kernel) is under test."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import flotilla
from flotilla.config import ConfigError, validate
from flotilla.core.device import CUDA_MISSING, resolve_device, to_device
from tests.helpers import synthetic_dataset

BASE = {"task": {"name": "fashion-mnist"}, "rounds": 1}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Only for decisions: nothing may run a kernel while this is on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_resolve_device(no_gpu):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError) as e:
        resolve_device("cuda")
    assert str(e.value) == CUDA_MISSING and "\n" not in CUDA_MISSING
    with pytest.raises(ValueError, match="device: must be one of cpu, cuda, auto, got 'tpu'"):
        resolve_device("tpu")


def test_auto_picks_the_gpu_when_torch_sees_one(fake_gpu):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")


def test_cuda_without_a_gpu_is_refused_when_the_config_is_read(no_gpu):
    with pytest.raises(ConfigError) as e:
        validate({**BASE, "device": "cuda"})
    assert str(e.value) == f"invalid config:\n  {CUDA_MISSING}"  # one line, naming the key
    with pytest.raises(ConfigError, match=r"device: Input should be 'cpu', 'cuda' or 'auto' \(got 'gpu'\)"):
        validate({**BASE, "device": "gpu"})
    assert validate({**BASE, "device": "auto"}).device == "auto"
    assert validate(BASE).device == "cpu"  # the default
    with pytest.raises(ValueError, match="device: cuda was asked for"):  # and from Python, past the config
        flotilla.train(nn.Linear(5, 3), synthetic_dataset(4), rounds=1, cohort=2, device="cuda")


def test_gpu_refusals(fake_gpu):
    with pytest.raises(ConfigError, match="workers: worker processes are forked and CUDA cannot run"):
        validate({**BASE, "device": "cuda", "workers": 2})
    with pytest.raises(ConfigError, match="device: client.algorithm fedprox keeps its state on the CPU"):
        validate({**BASE, "device": "auto", "client": {"algorithm": {"name": "fedprox", "mu": 0.1}}})
    from flotilla.sim.parallel import ParallelFedAvg

    with pytest.raises(ValueError, match="workers: worker processes are forked"):
        ParallelFedAvg(nn.Linear(5, 3), synthetic_dataset(4), F.cross_entropy, cohort=2, workers=2, device="cuda")


def _train(run_dir=None, **keys):
    torch.manual_seed(0)
    data = synthetic_dataset(6)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    return flotilla.train(model, data, rounds=2, cohort=3, seed=4, run_dir=run_dir, **keys)


@pytest.mark.parametrize(
    "keys",
    [{}, {"mode": "async", "fleet": {"population": 6}, "async": {"concurrency": 3, "buffer_size": 2}}],
    ids=["sync", "fleet-async"],
)
def test_device_cpu_gives_the_same_bits_as_no_key(keys):
    plain = _train(**keys)
    cpu = _train(device="cpu", **keys)
    auto = _train(device="auto", **keys) if not torch.cuda.is_available() else cpu
    assert torch.equal(plain.weights, cpu.weights) and torch.equal(plain.weights, auto.weights)
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in cpu.history]


def test_to_device_leaves_cpu_batches_alone():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    batch = (x, y)
    assert to_device(batch, torch.device("cpu")) is batch
    assert to_device({"x": x}, torch.device("cpu"))["x"] is x


def test_join_device_flag(no_gpu):
    import argparse

    from flotilla.network.cli import add_parsers
    from flotilla.network.client import Device

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    join = ["join", "--server", "127.0.0.1:1", "--data", "d.safetensors"]
    assert parser.parse_args(join).device == "cpu"
    assert parser.parse_args([*join, "--device", "auto"]).device == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args([*join, "--device", "tpu"])

    with pytest.raises(ValueError) as e:
        Device("127.0.0.1:1", "token", nn.Linear(5, 3), (torch.randn(4, 5), torch.tensor([0, 1, 2, 0])), device="cuda")
    assert str(e.value) == CUDA_MISSING


def tiny_task(seed: int):
    """The config-file task of the resume test: 6 synthetic clients, a small MLP."""
    return {"model": nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), "data": synthetic_dataset(6)}


def test_a_gpu_run_resumes_on_a_cpu(tmp_path, no_gpu, monkeypatch):
    """A run whose saved config says device: cuda resumes here with --set device=cpu (its checkpoint
    holds CPU tensors) and ends where an uninterrupted run ends, bit for bit."""
    from pathlib import Path

    import yaml

    import flotilla.runner as runner
    from flotilla.cli import main

    seen, real = [], runner.to_cpu

    def spy(state):
        seen.append(set(state))
        return real(state)

    monkeypatch.setattr(runner, "to_cpu", spy)

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the factory is found from the repository root
    cfg = {
        "task": {"name": "python", "factory": "tests.test_device:tiny_task"},
        "rounds": 3,
        "cohort": 3,
        "output": {"progress": False},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", str(path), "--run-dir", str(full)]) == 0
    path.write_text(yaml.safe_dump({**cfg, "rounds": 1}))
    assert main(["run", str(path), "--run-dir", str(cut)]) == 0
    saved = yaml.safe_load((cut / "config.yaml").read_text())
    (cut / "config.yaml").write_text(yaml.safe_dump({**saved, "device": "cuda"}))  # as a GPU run leaves it
    assert main(["run", "--resume", str(cut), "--set", "rounds=3"]) == 2  # cuda is not here: refused
    assert main(["run", "--resume", str(cut), "--set", "rounds=3", "--set", "device=cpu"]) == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((cut / "config.yaml").read_text())["device"] == "cpu"
    # Both files go through to_cpu (a GPU run's tensors come back to the CPU before saving) and hold CPU tensors.
    assert any("weights" in keys for keys in seen) and any("0.weight" in keys for keys in seen)
    for f in ("state.safetensors", "model.safetensors"):
        tensors = load_file(str(full / f))
        assert tensors and all(t.device.type == "cpu" for t in tensors.values())
