"""Flower (``flwr[simulation]``, Ray backend) on a speed-benchmark workload.

Runs in its own venv (benchmarks/.peers/flower).  Written the way Flower's own PyTorch
quickstart is, with the Message API: a ``ClientApp`` whose ``@train`` function loads the global
``ArrayRecord`` into the model, trains the node's partition, and replies with its weights and
``num-examples``; a ``ServerApp`` running the built-in ``FedAvg`` strategy
(``fraction_train = cohort / population``, no client-side evaluation) and a central
``evaluate_fn`` (only the final round evaluates, with the same code as the bare loop).
To be kind to Flower, each Ray worker process loads the data and builds the model once and
reuses them, and every client gets one CPU (``num_cpus: 1``), so two run side by side on 2 cores.

    benchmarks/.peers/flower/bin/python benchmarks/speed/fl_flower.py --data benchmarks/out/data/fmnist
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import Workload, base_args, emit, evaluate, load, make_model, round_stats  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from torch.nn import functional as F  # noqa: E402

_CACHE: dict = {}


def _worker_state():
    """Per Ray worker process: the data and one model, built once."""
    if not _CACHE:
        torch.set_num_threads(1)
        wl = Workload(os.environ["BENCH_DATA"], json.loads(os.environ["BENCH_OVERRIDES"]))
        model = make_model(wl.meta)
        _CACHE.update(wl=wl, model=model, opt=torch.optim.SGD(model.parameters(), lr=wl.meta["lr"]))
    return _CACHE["wl"], _CACHE["model"], _CACHE["opt"]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    wl, model, opt = _worker_state()
    m = wl.meta
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    user = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    x, y = wl.user_data(user)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([m["seed"], rnd, user]).generate_state(1)[0]))
    n, loss_sum, steps = len(y), 0.0, 0
    for _ in range(m["epochs"]):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, m["batch"]):
            idx = order[i : i + m["batch"]]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            loss_sum += loss.detach().item()
            steps += 1
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": n, "train_loss": loss_sum / max(steps, 1)}),
        }
    )
    return Message(content=content, reply_to=msg)


def main() -> None:
    args = base_args(__doc__).parse_args()
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    wl = load(args)
    m = wl.meta
    os.environ["BENCH_DATA"] = str(Path(args.data).resolve())
    os.environ["BENCH_OVERRIDES"] = json.dumps({k: m[k] for k in ("rounds", "users", "seed") if k in m})
    net = make_model(m)
    stamps: list[float] = []
    server_app = ServerApp()

    def central_eval(server_round: int, arrays: ArrayRecord):
        stamps.append(time.perf_counter())
        if server_round < m["rounds"]:
            return None
        net.load_state_dict(arrays.to_torch_state_dict())
        ev = evaluate(net, wl.x_test, wl.y_test)
        stamps[-1] = time.perf_counter()
        emit({"framework": "flower", **ev, "rounds": server_round, **round_stats(stamps)})
        return MetricRecord(ev)

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=m["cohort"] / wl.num_users,
            fraction_evaluate=0.0,
            min_train_nodes=m["cohort"],
            min_evaluate_nodes=0,
            min_available_nodes=wl.num_users,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(net.state_dict()),
            num_rounds=m["rounds"],
            train_config=ConfigRecord({}),
            evaluate_fn=central_eval,
        )

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=wl.num_users,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False},
        },
    )


if __name__ == "__main__":
    main()
