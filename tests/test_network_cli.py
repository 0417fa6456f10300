"""`flotilla certs`, `flotilla status`, and the `network:` config section."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flotilla.cli import main
from flotilla.client import Connection
from flotilla.config import ConfigError, load_config
from flotilla.experiment.serve import server_from_config
from flotilla.network.cli import format_status
from flotilla.network.client import Refused
from flotilla.network.server import Limits
from tests.network_helpers import PKI, start_server


def test_certs_writes_a_working_pki_with_private_files(tmp_path, capsys):
    assert main(["certs", str(tmp_path / "pki"), "--devices", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "pki").iterdir())
    assert names == [
        "ca.key",
        "ca.pem",
        "client.key",
        "client.pem",
        "server.key",
        "server.pem",
        "tokens.json",
        "tokens.txt",
    ]
    for private in ("ca.key", "server.key", "client.key", "tokens.txt"):
        assert stat.S_IMODE((tmp_path / "pki" / private).stat().st_mode) == 0o600
    table = json.loads((tmp_path / "pki" / "tokens.json").read_text())["devices"]
    assert sorted(table) == ["admin", "device-000", "device-001"]
    assert all(len(e["sha256"]) == 64 for e in table.values())  # hashes only, no tokens
    assert "flt_" not in (tmp_path / "pki" / "tokens.json").read_text()
    # refuses to overwrite a deployment by accident, and names the flag that would (issue 11 item 11)
    before = (tmp_path / "pki" / "tokens.txt").read_bytes()
    assert main(["certs", str(tmp_path / "pki")]) == 2
    err = capsys.readouterr().err
    assert "already holds ca.pem, ca.key" in err and "pass --force to overwrite them" in err
    assert "overwrite=True" not in err
    assert (tmp_path / "pki" / "tokens.txt").read_bytes() == before
    assert main(["certs", str(tmp_path / "pki"), "--force", "--devices", "1"]) == 0
    assert (tmp_path / "pki" / "tokens.txt").read_bytes() != before


def test_status_command_shows_progress_and_refusals(tmp_path, capsys):
    pki = PKI(tmp_path / "pki", devices=2)
    with start_server(pki, tmp_path / "s", cohort=1, total_steps=3, limits=Limits(rate=100, burst=200)) as st:
        with Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca) as c:
            a = c.check_in(5).assignment
            c.upload(a, torch.full((18,), 0.01), 5)
            a = c.check_in(5).assignment
            with pytest.raises(Refused, match="non-finite"):
                c.upload(a, torch.full((18,), float("nan")), 5)
            for _ in range(100):  # metrics are written by the evaluation thread
                if c.status()["metrics"]:
                    break
                time.sleep(0.05)
        args = ["status", "--server", f"localhost:{st.port}", "--ca", pki.ca, "--token", pki.tokens["admin"]]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "sync training, round 1 of 3" in out
        assert "clients in flight: 1" in out
        assert "updates accepted: 1   rejected: 1 (nonfinite 1)" in out
        assert "metrics at version 1: train_loss 0.0000" in out
        assert main(args + ["--json"]) == 0
        s = json.loads(capsys.readouterr().out)
        assert (s["version"], s["accepted"], s["rejected_by_reason"]) == (1, 1, {"nonfinite": 1})
        assert main(args[:-1] + ["wrong"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err


def _serve_config(tmp_path, pki, **network):
    cfg = {
        "task": {"name": "fashion-mnist", "num_clients": 4, "examples_per_client": 5},
        "rounds": 1,
        "cohort": 2,
        "network": {
            "tls": {"cert": str(pki.paths["server_pem"]), "key": str(pki.paths["server_key"])},
            "tokens": str(pki.paths["tokens_json"]),
            **network,
        },
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "network, key, reason",
    [
        ({"chunk_kb": 8192}, "network", "chunk_kb: 8192 KiB chunks do not fit"),
        ({"tls": {"cert": "a", "key": "b", "require_client_cert": True}}, "network.tls", "ca: required"),
        ({"over_selection": 0.5}, "network.over_selection", "greater than or equal to 1"),
        ({"rate_limit": 0}, "network.rate_limit", "greater than 0"),
        ({"bogus": 1}, "network.bogus", "unknown key"),
    ],
)
def test_network_config_errors_name_the_key(tmp_path, network, key, reason):
    pki = PKI(tmp_path / "pki", devices=1)
    with pytest.raises(ConfigError) as e:
        load_config(_serve_config(tmp_path, pki, **network))
    assert f"{key}:" in str(e.value) and reason in str(e.value)


def test_serve_refuses_settings_it_cannot_honour(tmp_path):
    pki = PKI(tmp_path / "pki", devices=1)
    path = _serve_config(tmp_path, pki, min_updates=5)
    with pytest.raises(ConfigError, match="network.min_updates: must be between 1 and cohort=2"):
        server_from_config(load_config(path), state_dir=tmp_path / "s")
    with pytest.raises(ConfigError, match="fleet: describes a simulated fleet"):
        server_from_config(load_config(path, ["network.min_updates=1", "fleet={}"]), state_dir=tmp_path / "s")
    with pytest.raises(ConfigError, match="network: flotilla serve needs a network section"):
        server_from_config(load_config(path, ["network=null"]), state_dir=tmp_path / "s")


@pytest.mark.parametrize("missing", ["cert", "key", "tokens"])
def test_serve_checks_its_files_before_creating_anything(tmp_path, capsys, missing):
    """issue 11 item 11: a missing certificate was found only after the state directory existed."""
    pki = PKI(tmp_path / "pki", devices=1)
    path = _serve_config(tmp_path, pki)
    gone = {"cert": pki.paths["server_pem"], "key": pki.paths["server_key"], "tokens": pki.paths["tokens_json"]}[
        missing
    ]
    gone.unlink()
    state = tmp_path / "state"
    assert main(["serve", str(path), "--port", "0", "--state-dir", str(state)]) == 2
    assert not state.exists()
    err = capsys.readouterr().err.strip()
    key = "network.tokens" if missing == "tokens" else f"network.tls.{missing}"
    assert (
        err == f"flotilla: error: {key}: {gone} not found (make test certificates and tokens with `flotilla certs DIR`)"
    )


def test_serve_refuses_a_key_that_is_not_the_certificates_before_creating_anything(tmp_path, capsys):
    pki = PKI(tmp_path / "pki", devices=1)
    path = _serve_config(tmp_path, pki, tls={"cert": str(pki.paths["server_pem"]), "key": str(pki.paths["client_key"])})
    state = tmp_path / "state"
    assert main(["serve", str(path), "--port", "0", "--state-dir", str(state)]) == 2
    assert "network.tls.key:" in capsys.readouterr().err and not state.exists()


def test_ctrl_c_on_serve_stops_cleanly(tmp_path):
    """issue 11 item 22: Ctrl-C printed "state is saved" and then a `RuntimeError: Event loop is
    closed` traceback.  Now the server stops on its own loop: one line, exit 130, no traceback,
    and the same command resumes."""
    pki = PKI(tmp_path / "pki", devices=1)
    path = _serve_config(tmp_path, pki)
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "flotilla.cli",
        "serve",
        str(path),
        "--port",
        "0",
        "--state-dir",
        str(tmp_path / "state"),
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in p.stdout:
            if line.startswith("listening on"):
                break
        else:
            raise AssertionError(p.stderr.read())
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted; state is saved, run the same command to resume" in err
    assert "Traceback" not in err and "Event loop is closed" not in err and "never awaited" not in err
    assert "INFO flotilla.network: serving on 127.0.0.1:" in err  # our log, though Opacus configures logging on import
    assert (tmp_path / "state" / "state.safetensors").exists() or (tmp_path / "state" / "config.yaml").exists()


def test_serve_with_dashboard_and_metrics_ports(tmp_path):
    """`serve --dashboard --metrics-port`: both answer while the server runs, Ctrl-C still stops it
    cleanly; an exposed dashboard without a token is refused before any state is made."""
    import urllib.request

    pki = PKI(tmp_path / "pki", devices=1)
    path = _serve_config(tmp_path, pki)
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    base = [sys.executable, "-m", "flotilla.cli", "serve", str(path), "--port", "0", "--state-dir"]
    refused = subprocess.run(
        [*base, str(tmp_path / "nope"), "--dashboard", "--dashboard-host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert refused.returncode == 2 and "needs a token" in refused.stderr
    assert not (tmp_path / "nope").exists()
    cmd = [*base, str(tmp_path / "state"), "--dashboard", "--dashboard-port", "0", "--metrics-port", "0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    urls = {}
    try:
        for line in p.stdout:
            for kind in ("dashboard", "prometheus metrics"):
                if line.startswith(kind + ": "):
                    urls[kind] = line.split(": ", 1)[1].split()[0]
            if line.startswith("listening on"):
                break
        else:
            raise AssertionError(p.stderr.read())
        time.sleep(1.5)  # the server's loop builds its first snapshot
        text = urllib.request.urlopen(urls["prometheus metrics"], timeout=10).read().decode()
        assert "flotilla_model_version 0.0" in text and "flotilla_training_done 0.0" in text
        info = json.loads(urllib.request.urlopen(urls["dashboard"] + "api/info", timeout=10).read())
        assert info == {"runs": True, "deployment": True}
        snap = json.loads(urllib.request.urlopen(urls["dashboard"] + "api/deployment", timeout=10).read())
        assert snap["status"]["version"] == 0 and snap["devices_seen"] == 0
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err


def test_status_shows_epsilon_without_json():
    """issue 11 item 28: the docs say `flotilla status` shows epsilon; only --json did."""
    s = {
        "mode": "sync",
        "round": 3,
        "version": 3,
        "total_steps": 10,
        "done": False,
        "uptime_s": 12,
        "in_flight": 2,
        "buffered": 0,
        "timed_out": 0,
        "accepted": 6,
        "rejected": 0,
        "rejected_by_reason": {},
        "metrics": {},
        "weights_sha256": "ab" * 32,
        "privacy": {
            "epsilon": 1.2345678,
            "delta": 1e-5,
            "noise_multiplier": 1.1,
            "sample_rate": 1.0,
            "amplification": False,
            "budget": 8.0,
            "steps_allowed": 40,
            "clip_norm": 0.5,
            "accountant": "rdp",
            "budget_spent": False,
        },
    }
    out = format_status(s)
    assert (
        "privacy: epsilon 1.235 at delta 1e-05 (rdp)   clip norm 0.5   noise multiplier 1.1   "
        "budget 8 (40 steps allowed)"
    ) in out
    s["privacy"].update(epsilon=None, budget=None)
    assert "privacy: epsilon inf at delta 1e-05" in format_status(s)
    del s["privacy"]
    assert "epsilon" not in format_status(s)
