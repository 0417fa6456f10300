"""The dashboard: run files read while written, the web app and its token, the deployment view and
Prometheus metrics of a live server, and the page itself in a real (headless) Chromium."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flotilla.api import train
from flotilla.cli import main as cli_main
from flotilla.dashboard.app import build_app
from flotilla.dashboard.runs import RunsWatcher
from flotilla.dashboard.serve import DashboardThread, bind, check_exposure
from flotilla.network.client import Device
from flotilla.network.metrics import start_exporter
from tests.helpers import synthetic_dataset
from tests.network_helpers import PKI, start_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(cond, timeout: float = 60.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def browser():
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1800",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture
def dashboard():
    started = []

    def start(**kwargs):
        d = DashboardThread(build_app(poll_s=0.2, **kwargs), bind("127.0.0.1", 0))
        started.append(d)
        return d, f"http://127.0.0.1:{d.port}/"

    yield start
    for d in started:
        d.stop()


def test_the_watcher_reads_only_complete_lines_and_rereads_a_truncated_file(tmp_path):
    run = tmp_path / "runs" / "group" / "a"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("rounds: 3\n")
    w = RunsWatcher(tmp_path / "runs")
    assert w.poll()[0][0].name == "group/a"  # found one level down too
    with open(run / "metrics.jsonl", "w") as f:
        f.write('{"round": 1}\n{"round": 2')  # a writer mid-append
    assert w.poll()[1] == {"group/a": [{"round": 1}]}
    with open(run / "metrics.jsonl", "a") as f:
        f.write("}\n")
    assert w.poll()[1] == {"group/a": [{"round": 2}]}
    assert w.poll()[1] == {}
    (run / "metrics.jsonl").write_text('{"round": 1}\n')  # a resume dropped lines after its checkpoint
    w.poll()
    assert w.runs["group/a"].records == [{"round": 1}]
    with pytest.raises(FileNotFoundError, match="no such folder of runs"):
        RunsWatcher(tmp_path / "nowhere")


def test_a_token_guards_every_route_and_an_exposed_host_needs_one(tmp_path, dashboard):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("rounds: 1\n")
    _, url = dashboard(runs_dir=tmp_path, token="s3cret")
    for path in ("", "plotly.min.js", "api/runs", "api/info", "api/events"):
        assert get(url + path)[0] == 401, path
    status, body = get(url + "?token=s3cret")
    assert status == 200 and b"plotly.min.js?token=s3cret" in body  # the page passes its token on
    status, body = get(url + "plotly.min.js?token=s3cret")
    assert status == 200 and len(body) > 1_000_000  # the real Plotly, from the installed package
    assert json.loads(get(url + "api/runs?token=s3cret")[1])[0]["name"] == "r"
    with pytest.raises(ValueError, match="needs a token"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", "t")
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)


def test_the_dashboard_command_refuses_a_missing_folder_and_an_exposed_host_without_token(tmp_path, capsys):
    assert cli_main(["dashboard", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "no such folder of runs" in capsys.readouterr().err
    assert cli_main(["dashboard", str(tmp_path), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "needs a token" in capsys.readouterr().err


def slow_loss(logits, y):
    time.sleep(0.03)  # a real run, slowed so the page sees it progress
    return F.cross_entropy(logits, y)


def test_the_page_draws_runs_live_with_one_colour_per_run(tmp_path, dashboard, browser):
    runs = tmp_path / "runs"
    data = synthetic_dataset(num_clients=6, per_client=20)
    common = {"cohort": 3, "eval": {"every": 1}, "client": {"batch_size": 10}}
    torch.manual_seed(0)
    train(nn.Linear(5, 3), data, rounds=4, run_dir=runs / "first", **common)  # finished before the page opens
    _, url = dashboard(runs_dir=runs)
    browser.get(url)
    wait_for(lambda: browser.execute_script("return window.flotilla.runs.size") == 1, what="the finished run")

    def points(run: str, chart: str = "chart-accuracy") -> int:
        return browser.execute_script(
            "const t = (document.getElementById(arguments[1]).data || []).find(t => t.name === arguments[0]);"
            "return t ? t.x.length : 0;",
            run,
            chart,
        )

    wait_for(lambda: points("first") == 4, what="the finished run's 4 points")
    torch.manual_seed(1)
    running = threading.Thread(
        target=train, args=(nn.Linear(5, 3), data, slow_loss), kwargs=dict(rounds=8, run_dir=runs / "second", **common)
    )
    running.start()
    first_seen = wait_for(lambda: points("second"), what="the running run's first point")
    grew = wait_for(lambda: points("second") > first_seen and running.is_alive(), what="the chart to grow mid-run")
    assert grew
    running.join(120)
    wait_for(lambda: points("second") == 8, what="all 8 rounds")
    rows = wait_for(
        lambda: (
            browser.execute_script(
                "return [...document.querySelectorAll('#runs tbody tr')].map(r => r.innerText.split('\\t')[1] + ':' + r.innerText.split('\\t')[2])"
            )
            == ["first:finished", "second:finished"]
        ),
        what="both runs listed as finished",
    )
    assert rows
    colours = browser.execute_script(
        "const c = {}; for (const id of ['chart-accuracy', 'chart-loss', 'chart-train-loss'])"
        "  for (const t of document.getElementById(id).data) (c[t.name] = c[t.name] || []).push(t.line.color);"
        "return c;"
    )
    assert set(colours) == {"first", "second"}
    assert all(len(set(v)) == 1 and len(v) == 3 for v in colours.values())  # one colour per run in every panel
    assert colours["first"][0] != colours["second"][0]
    browser.save_screenshot(str(tmp_path / "runs.png"))
    if os.environ.get("FLOTILLA_SCREENSHOTS"):
        browser.save_screenshot(os.path.join(os.environ["FLOTILLA_SCREENSHOTS"], "dashboard-runs.png"))
    assert (tmp_path / "runs.png").stat().st_size > 10_000


def test_a_live_deployment_in_the_page_and_in_prometheus(tmp_path, dashboard, browser):
    pki = PKI(tmp_path / "pki")
    data = synthetic_dataset(num_clients=4, per_client=20)
    with start_server(pki, tmp_path / "s", cohort=2, total_steps=4, linger_s=3.0) as st:
        httpd, _ = start_exporter(st.server, 0)
        metrics_url = f"http://127.0.0.1:{httpd.server_port}/metrics"
        _, url = dashboard(runs_dir=st.server.store.path, deployment=st.server.observed.snapshot)
        browser.get(url)
        # a call with a forged token is refused and counted by reason
        from flotilla.client import Connection, Refused

        with pytest.raises(Refused, match="unknown client"):
            Connection(f"localhost:{st.port}", "forged", ca=pki.ca).check_in(10)

        def device(i):
            torch.manual_seed(i)
            Device(f"localhost:{st.port}", pki.token(i), nn.Linear(5, 3), data, client=i, ca=pki.ca).run()

        threads = [threading.Thread(target=device, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        snap = wait_for(
            lambda: (s := json.loads(get(url + "api/deployment")[1])).get("status", {}).get("done") and s,
            what="the snapshot of the finished deployment",
        )
        assert snap["devices_seen"] == 2 and snap["status"]["accepted"] == 8
        assert snap["status"]["rejected_by_reason"] == {"auth": 1}
        assert snap["bytes_in"] == 8 * 18 * 4  # 8 uploads of Linear(5, 3): 18 float32
        assert snap["bytes_out"] > 0 and snap["step_latency_s"]["count"] == 4
        assert [e["event"] for e in snap["ledger_tail"]].count("step") == 4
        text = get(metrics_url)[1].decode()
        for line in (
            "flotilla_uploads_accepted_total 8.0",
            'flotilla_uploads_refused_total{reason="auth"} 1.0',
            "flotilla_devices_seen 2.0",
            "flotilla_model_version 4.0",
            "flotilla_training_done 1.0",
            "flotilla_server_step_seconds_count 4.0",
            f"flotilla_bytes_in_total {8 * 18 * 4}.0",
        ):
            assert line in text, line
        cards = wait_for(
            lambda: "4 / 4 (done)" in (t := browser.find_element("id", "deploy-cards").text) and t,
            what="the deployment cards",
        )
        assert "devices seen" in cards and "accepted" in cards
        wait_for(lambda: browser.execute_script("return window.flotilla.runs.size") == 1, what="the server's run")
        browser.save_screenshot(str(tmp_path / "deployment.png"))
        if os.environ.get("FLOTILLA_SCREENSHOTS"):
            browser.save_screenshot(os.path.join(os.environ["FLOTILLA_SCREENSHOTS"], "dashboard-deployment.png"))
        httpd.shutdown()
