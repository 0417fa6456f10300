"""A web dashboard for runs and deployments: ``flotilla dashboard RUNS_DIR`` and ``flotilla serve --dashboard``.

- ``runs.py``: finds run directories and tails their ``metrics.jsonl`` as they grow (no lock needed).
- ``deployment.py``: what the deployment view shows of a live ``flotilla serve`` (a snapshot the server
  refreshes on its own event loop, plus the ledger's last lines).
- ``app.py``: the Starlette app (page, JSON, server-sent events, token check).
- ``page.html``: one page drawing with Plotly's JavaScript from the installed ``plotly`` package (no CDN).
- ``serve.py``: runs the app with uvicorn, blocking or in a background thread.

Needs the ``dashboard`` extra (``pip install 'flotilla[dashboard]'``).
"""
