"""A/B of one round, in one process: Flotilla's SyncFedAvg.step vs the bare loop's round, alternating.

    .venv/bin/python benchmarks/speed/round_ab.py [--data benchmarks/out/data/fmnist] [--rounds 4]

Same data, same cohorts, CPU seconds per round (steadier than wall time on a loaded machine).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from common import base_args, load, make_model
from fl_flotilla import federated
from fl_raw import client_seed, sample_cohort
from torch.nn import functional as F

from flotilla.core.client import ClientSpec
from flotilla.sim.sync import SyncFedAvg

p = base_args(__doc__)
p.set_defaults(data=str(Path(__file__).resolve().parents[1] / "out" / "data" / "fmnist"))
for act in p._actions:
    if act.dest == "data":
        act.required = False
a = p.parse_args()
n_rounds = a.rounds or 4
a.rounds = None
wl = load(a)
m = wl.meta
alg = SyncFedAvg(
    make_model(m),
    federated(wl),
    F.cross_entropy,
    cohort=m["cohort"],
    seed=m["seed"],
    client=ClientSpec(epochs=m["epochs"], batch_size=m["batch"], lr=m["lr"]),
)
model = make_model(m)
params = list(model.parameters())
gw = [p.detach().clone() for p in params]
ds = [torch.zeros_like(p) for p in params]
opt = torch.optim.SGD(params, lr=m["lr"])


def raw_round(r):
    for d in ds:
        d.zero_()
    tot = 0.0
    for c in sample_cohort(m["seed"], r, wl.num_users, m["cohort"]).tolist():
        with torch.no_grad():
            for p, g in zip(params, gw):
                p.copy_(g)
        x, y = wl.user_data(c)
        gen = torch.Generator().manual_seed(client_seed(m["seed"], r, c))
        n = len(y)
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, m["batch"]):
            idx = order[i : i + m["batch"]]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            for d, p, g in zip(ds, params, gw):
                d.add_(p - g, alpha=float(n))
        tot += n
    with torch.no_grad():
        for g, d in zip(gw, ds):
            g.add_(d / tot)


for rep in range(n_rounds):
    t = time.process_time()
    alg.step()
    tf = time.process_time() - t
    t = time.process_time()
    raw_round(rep)
    tr = time.process_time() - t
    print(f"round {rep}: flotilla {tf:.3f} s CPU, raw {tr:.3f} s CPU")
