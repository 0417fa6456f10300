"""`flotilla join` / `flotilla.client.Device` usability and liveness (issue 11, items 9, 11, 21):
certificate errors fail fast with one clear line, bad local data is refused before the device
takes any work, rate limits are waited out, and an assignment the device cannot satisfy is given
up once instead of being retrained in a loop.  Loopback only, tiny models, a few seconds each."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from torch.nn import functional as F

from flotilla.cli import main
from flotilla.client import Backoff, Connection, Device, GaveUp, Refused, TLSError, save_device_data
from flotilla.network.certs import make_deployment
from flotilla.network.server import Limits
from tests.network_helpers import PKI, start_server, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int = 8, features: int = 5, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    pki = PKI(root / "pki", devices=3)
    pki.other = make_deployment(root / "other", devices=1)  # a second, unrelated CA and client certificate
    return pki


# -- item 9: TLS handshake failures end at once with a certificate error -----------------------


@pytest.mark.parametrize(
    "mtls, tls, expect",
    [
        (False, {}, "not signed by a CA this device trusts: give the CA that signed it with --ca"),
        (False, {"ca": "other"}, "not signed by the CA given with --ca"),
        (True, {"ca": "own"}, "the server requires a client certificate (mutual TLS): give --cert and --key"),
        (True, {"ca": "own", "cert": "other"}, "the server refused this device's client certificate"),
    ],
)
def test_tls_handshake_failure_fails_fast_with_a_certificate_error(tmp_path, pki, mtls, tls, expect):
    kw = {}
    if tls.get("ca"):
        kw["ca"] = pki.ca if tls["ca"] == "own" else pki.other["ca_pem"]
    if tls.get("cert"):
        kw.update(cert=pki.other["client_pem"], key=pki.other["client_key"])
    with start_server(pki, tmp_path / "s", cohort=1, total_steps=1, require_client_cert=mtls) as st:
        device = Device(
            f"localhost:{st.port}", pki.token(0), tiny_model(), _data(), backoff=Backoff(give_up_after_s=5.0), **kw
        )  # (the old code retried for 300 s)
        t0 = time.monotonic()
        with pytest.raises(TLSError) as e:
            device.run()
        assert time.monotonic() - t0 < 3.0
        assert str(e.value).startswith(f"TLS handshake with localhost:{st.port} failed: ")
        assert expect in str(e.value)
        # the right credentials still work (the failure was the certificate, not the server)
        good = {"ca": pki.ca, **({"cert": pki.paths["client_pem"], "key": pki.paths["client_key"]} if mtls else {})}
        with Connection(f"localhost:{st.port}", pki.token(0), **good) as c:
            assert c.status()["version"] == 0


def test_join_without_ca_prints_one_line_and_no_grpc_log(tmp_path, pki):
    """`flotilla join` as a user runs it: the error is our one line, without gRPC's C-core log
    lines (ssl_transport_security.cc ...) around it."""
    data = tmp_path / "d.safetensors"
    save_device_data(data, *_data())
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE", "FLOTILLA_CA")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with start_server(pki, tmp_path / "s", cohort=1, total_steps=1) as st:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "flotilla.cli",
                "join",
                "--server",
                f"localhost:{st.port}",
                "--token",
                pki.token(0),
                "--data",
                str(data),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(
        f"flotilla: error: TLS handshake with localhost:{st.port} failed: the server's "
        "certificate is not signed by a CA this device trusts"
    )
    assert "ssl_transport_security" not in p.stderr


# -- item 9: local data is checked before the device takes an assignment -----------------------


@pytest.mark.parametrize(
    "x, y, expect",
    [
        (
            torch.randn(8, 7),
            torch.zeros(8, dtype=torch.long),
            "data: the model cannot train on this device's data (x (8, 7) float32",
        ),
        (
            torch.randn(8, 5),
            torch.arange(8),
            "data: labels y range over 0..7, but the model has 3 classes (labels 0..2)",
        ),
        (torch.full((8, 5), float("nan")), torch.zeros(8, dtype=torch.long), "data: x holds non-finite values"),
    ],
)
@pytest.mark.parametrize("by_task", [False, True])
def test_bad_local_data_is_refused_before_check_in(tmp_path, pki, x, y, expect, by_task):
    """Wrong shape, labels out of range, NaN inputs: one clear line, and the server handed out no
    assignment (none in flight, none assigned).  ``by_task``: the model is built from the task the
    server names, as `flotilla join` does."""
    task = {"name": "tiny", "classes": 3}
    model = (lambda t: tiny_model(out=t["classes"])) if by_task else tiny_model()
    with start_server(pki, tmp_path / "s", cohort=1, total_steps=1, task=task) as st:
        device = Device(f"localhost:{st.port}", pki.token(0), model, (x, y), ca=pki.ca)
        with pytest.raises(ValueError) as e:
            device.run()
        assert str(e.value).startswith(expect), str(e.value)
        assert "\n" not in str(e.value)
        with Connection(f"localhost:{st.port}", pki.tokens["admin"], ca=pki.ca) as c:
            s = c.status()
        assert (s["assigned"], s["in_flight"]) == (0, 0)


def test_join_with_bad_labels_exits_2_before_taking_work(tmp_path, pki, capsys):
    data = tmp_path / "d.safetensors"
    save_device_data(data, torch.randn(8, 5), torch.full((8,), 9))
    with start_server(pki, tmp_path / "s", cohort=1, total_steps=1, task={"name": "tiny"}) as st:
        import flotilla.network.client as client_mod

        orig = client_mod.model_for_task
        client_mod.model_for_task = lambda task: tiny_model()  # the CLI's built-in model, for this task
        try:
            rc = main(
                [
                    "join",
                    "--server",
                    f"localhost:{st.port}",
                    "--token",
                    pki.token(0),
                    "--data",
                    str(data),
                    "--ca",
                    pki.ca,
                ]
            )
        finally:
            client_mod.model_for_task = orig
        with Connection(f"localhost:{st.port}", pki.tokens["admin"], ca=pki.ca) as c:
            assert c.status()["assigned"] == 0
    assert rc == 2
    assert "flotilla: error: data: labels y range over 9..9, but the model has 3 classes" in capsys.readouterr().err


# -- items 9 and 21: rate limits are waited out; the end of training is seen -------------------


def test_rate_limited_device_backs_off_and_still_sees_done(tmp_path, pki):
    """A device polling fast is rate limited (RESOURCE_EXHAUSTED): it backs off with jitter and
    carries on, and a device in back-off when training ends still gets DONE (the old client
    treated the rate limit as fatal and exited 1)."""
    events = []
    with start_server(
        pki,
        tmp_path / "s",
        cohort=1,
        total_steps=2,
        retry_after_s=0.01,
        selection_window_s=0.3,
        linger_s=10.0,
        limits=Limits(rate=4, burst=2),
    ) as st:
        device = Device(
            f"localhost:{st.port}",
            pki.token(0),
            tiny_model(),
            _data(),
            ca=pki.ca,
            backoff=Backoff(initial_s=0.1, max_s=1.0),
            on_event=lambda k, i: events.append((k, i)),
        )
        report = device.run()
        with Connection(f"localhost:{st.port}", pki.tokens["admin"], ca=pki.ca) as c:
            s = c.status()
    assert s["rejected_by_reason"].get("rate", 0) >= 1  # it was rate limited ...
    assert report.reconnects >= 1 and [k for k, _ in events].count("reconnect") >= 1
    assert len(report.accepted) == 2 and s["done"]  # ... and still trained every round
    assert events[-1][0] == "done"


def test_device_in_back_off_when_training_ends_still_sees_done(tmp_path, pki):
    """Device B is told "rate limit" on every check-in until device A's update has ended training;
    B backs off, checks in again while the server lingers, gets DONE and returns normally (exit 0
    in `flotilla join`).  The old device exited on the first rate-limit answer."""
    done, b_events = [], []
    with start_server(pki, tmp_path / "s", cohort=1, total_steps=1, linger_s=10.0) as st:
        b = Device(
            f"localhost:{st.port}",
            pki.token(1),
            tiny_model(),
            _data(seed=1),
            ca=pki.ca,
            backoff=Backoff(initial_s=0.05, max_s=0.5),
            on_event=lambda k, i: b_events.append(k),
        )
        real = b.conn.check_in

        def throttled(n):
            if not st.server.coord.done:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "rate limit: more than 20 requests/s from device-001; slow down",
                    retry="request",
                    reason="rate",
                )
            return real(n)

        b.conn.check_in = throttled
        t = threading.Thread(target=lambda: done.append(b.run()), daemon=True)
        t.start()
        a = Device(f"localhost:{st.port}", pki.token(0), tiny_model(), _data(), ca=pki.ca).run()
        t.join(30)
    assert len(a.accepted) == 1
    assert done and done[0].tasks == 0 and done[0].reconnects >= 1
    assert b_events[0] == "reconnect" and b_events[-1] == "done"


def test_device_whose_update_ends_training_stops_at_once(tmp_path, pki):
    """The upload that makes the last step tells the device training is over: it stops without
    checking in again (a server with linger_s: 0 is gone by then)."""
    calls = []
    with start_server(pki, tmp_path / "s", cohort=1, total_steps=1, linger_s=5.0) as st:
        device = Device(f"localhost:{st.port}", pki.token(0), tiny_model(), _data(), ca=pki.ca)
        check_in = device.conn.check_in
        device.conn.check_in = lambda n: calls.append(n) or check_in(n)
        report = device.run()
    assert len(report.accepted) == 1 and report.accepted[0]["version"] == 1
    assert len(calls) == 1


def test_retryable_answers():
    """What the device retries (after a pause) and what it does not."""

    def r(code, msg):
        return Refused(code, msg).retryable

    assert r(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    assert r(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")  # the call timed out on the way
    assert r(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit: more than 20 requests/s from device-000; slow down")
    assert not r(grpc.StatusCode.DEADLINE_EXCEEDED, "upload refused: assignment 1a2b3c4d expired")
    assert not r(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5000000 vs. 4194304)")
    assert not r(grpc.StatusCode.INVALID_ARGUMENT, "upload refused: update norm 0.3 exceeds the bound 0.001")
    assert Refused(
        grpc.StatusCode.FAILED_PRECONDITION, "upload refused: training finished at version 3"
    ).training_finished
    # a server that says what to do (trailing metadata flotilla-retry) is taken at its word
    assert not Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "assignment 1a2b expired", retry="checkin").retryable
    assert Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "another upload in flight", retry="request").retryable
    never = Refused(
        grpc.StatusCode.INVALID_ARGUMENT, "upload refused: update norm 0.3 exceeds the bound 0.001", retry="never"
    )
    assert not never.retryable and never.unsatisfiable
    assert not Refused(grpc.StatusCode.ALREADY_EXISTS, "upload refused: replayed nonce", retry="never").unsatisfiable


# -- item 21: an assignment the device cannot satisfy is given up, not retrained ---------------


def test_update_over_the_norm_bound_is_given_up_not_retrained(tmp_path, pki):
    """issue 11 item 21's reproduction: cohort 1, max_update_norm 0.001, one device.  The old
    device retrained the same delta 23 times in 3 s and died on the rate limit.  Now: one upload,
    the refusal's reason in a `gave_up` event, the re-issued ticket for the same round and seed
    given up without training, and after max_give_ups in a row one clear error."""
    events = []
    with start_server(
        pki,
        tmp_path / "s",
        cohort=1,
        total_steps=1,
        max_update_norm=0.001,
        assignment_timeout_s=0.4,
        round_deadline_s=0.3,
    ) as st:
        device = Device(
            f"localhost:{st.port}",
            pki.token(0),
            tiny_model(),
            _data(),
            ca=pki.ca,
            max_give_ups=2,
            on_event=lambda k, i: events.append((k, i)),
        )
        t0 = time.monotonic()
        with pytest.raises(GaveUp) as e:
            device.run()
        elapsed = time.monotonic() - t0
        with Connection(f"localhost:{st.port}", pki.tokens["admin"], ca=pki.ca) as c:
            s = c.status()
    assert "gave up 2 assignments in a row; the last because upload refused: update norm" in str(e.value)
    assert "exceeds the bound 0.001" in str(e.value)
    gave_up = [i for k, i in events if k == "gave_up"]
    assert len(gave_up) == 2 and gave_up[0]["assignment"] != gave_up[1]["assignment"]
    assert e.value.report.tasks == 1 and e.value.report.gave_up == gave_up  # trained once
    assert s["rejected_by_reason"] == {"norm": 1}  # trained and uploaded once, no rate limiting
    assert elapsed < 10


def test_diverged_training_is_given_up_without_upload(tmp_path, pki):
    """Non-finite values in the trained update (a diverging config): the device says so and sends
    nothing (the old one uploaded, was refused as nonfinite, and retrained in a loop)."""

    def diverging_loss(out, y):
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if torch.is_grad_enabled() else loss  # finite in the data check

    events = []
    with start_server(pki, tmp_path / "s", cohort=1, total_steps=1, assignment_timeout_s=0.4) as st:
        device = Device(
            f"localhost:{st.port}",
            pki.token(0),
            tiny_model(),
            _data(),
            diverging_loss,
            ca=pki.ca,
            max_give_ups=1,
            on_event=lambda k, i: events.append((k, i)),
        )
        with pytest.raises(GaveUp, match="training diverged: the update has non-finite values"):
            device.run()
        with Connection(f"localhost:{st.port}", pki.tokens["admin"], ca=pki.ca) as c:
            s = c.status()
    assert s["rejected"] == 0 and s["accepted"] == 0
    assert [k for k, _ in events] == ["gave_up"]
