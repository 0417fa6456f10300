"""The dashboard's web app: one page, its JSON, and a server-sent event stream.

Routes:
  /                 the page (page.html)
  /plotly.min.js    Plotly's JavaScript, from the installed ``plotly`` package (works offline)
  /api/info         which views this dashboard has (runs, deployment)
  /api/runs         every run: summary, config and all metric records
  /api/deployment   the live server's latest snapshot
  /api/events       server-sent events: ``run`` (a run appeared, with its records so far),
                    ``metrics`` (records appended), ``status`` (run summaries), ``deployment``

Each event stream keeps its own reader of the run files, so a page opened late gets everything and
then only what is new.  With a token, every route wants it: ``?token=...`` (the page passes its own
on), or ``Authorization: Bearer ...``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from flotilla.dashboard.runs import RunsWatcher

STATUS_EVERY_S = 2.0  # how often run summaries (running / finished) are re-sent


def plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the plotly package has no plotly.min.js (reinstall plotly)")
    return path


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, allow_nan=False)}\n\n"


def build_app(
    runs_dir: str | Path | None = None,
    deployment: Callable[[], dict[str, Any]] | None = None,
    token: str | None = None,
    poll_s: float = 0.5,
) -> Starlette:
    """``runs_dir``: a folder of run directories to show; ``deployment``: returns a live server's
    snapshot (:class:`flotilla.network.observe.Observations`); ``token``: required on every request."""
    if runs_dir is None and deployment is None:
        raise ValueError("the dashboard needs a folder of runs, a deployment, or both")
    if runs_dir is not None:
        RunsWatcher(runs_dir)  # a missing folder is refused now, not on the first page load
    page = resources.files("flotilla.dashboard").joinpath("page.html").read_text()
    js = plotly_js()

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = request.query_params.get("token") or request.headers.get("authorization", "").removeprefix("Bearer ")
        return hmac.compare_digest(given.encode(), token.encode())

    def guarded(handler):
        async def wrapped(request: Request):
            if not authorised(request):
                return PlainTextResponse("dashboard: a token is required (open the address printed at start)", 401)
            return await handler(request)

        return wrapped

    async def index(request: Request):
        # the page's own script tag carries the token on (the page was opened with it)
        return HTMLResponse(page.replace("__Q__", f"?token={quote(token)}" if token else ""))

    async def plotly(request: Request):
        return FileResponse(js, media_type="application/javascript")

    async def info(request: Request):
        return JSONResponse({"runs": runs_dir is not None, "deployment": deployment is not None})

    async def runs(request: Request):
        if runs_dir is None:
            return JSONResponse([])
        w = RunsWatcher(runs_dir)
        w.poll()
        return JSONResponse([{**r.summary(), "records": r.records} for r in w.runs.values()])

    async def deployment_now(request: Request):
        if deployment is None:
            return JSONResponse({"error": "no deployment on this dashboard"}, 404)
        return JSONResponse(deployment())

    async def events(request: Request):
        async def stream():
            watcher = RunsWatcher(runs_dir) if runs_dir is not None else None
            last_status, last_deployment = 0.0, None
            loop = asyncio.get_running_loop()
            yield ": connected\n\n"
            while not await request.is_disconnected():
                if watcher is not None:
                    appeared, grown = watcher.poll()
                    for run in appeared:
                        yield _event("run", {**run.summary(), "records": run.records})
                        grown.pop(run.name, None)  # already sent with the run
                    for name, records in grown.items():
                        yield _event("metrics", {"name": name, "records": records})
                    if loop.time() - last_status >= STATUS_EVERY_S:
                        last_status = loop.time()
                        yield _event("status", [r.summary() for r in watcher.runs.values()])
                if deployment is not None:
                    snap = deployment()
                    if snap and snap.get("time") != last_deployment:
                        last_deployment = snap.get("time")
                        yield _event("deployment", snap)
                await asyncio.sleep(poll_s)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    routes = [
        Route("/", guarded(index)),
        Route("/plotly.min.js", guarded(plotly)),
        Route("/api/info", guarded(info)),
        Route("/api/runs", guarded(runs)),
        Route("/api/deployment", guarded(deployment_now)),
        Route("/api/events", guarded(events)),
    ]
    return Starlette(routes=routes)
