"""A user-defined task for `task: {name: python, factory: quadrants:make_task}` (see own_task.yaml).

Reads a local CSV (`user,x,y,label`), gives each user's rows to one client (the last fifth of each
user's rows held out for testing), and returns a small MLP.  Nothing here knows about Flotilla's
internals: a model, a {client: Dataset} pair of dicts and a loss.
"""

import csv
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset


def make_task(seed: int, path: str = "points.csv", hidden: int = 16):
    rows = defaultdict(list)
    with Path(path).open() as f:
        for r in csv.DictReader(f):
            rows[r["user"]].append((float(r["x"]), float(r["y"]), int(r["label"])))
    if not rows:
        raise ValueError(f"{path}: no rows (expected a header user,x,y,label and one row per point)")
    train, test = {}, {}
    for user, pts in rows.items():
        t = torch.tensor(pts)
        x, y = t[:, :2].float(), t[:, 2].long()
        cut = int(len(t) * 0.8)
        train[user], test[user] = TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])
    return {"model": make_model(hidden=hidden), "data": (train, test), "loss_fn": F.cross_entropy}


def make_model(hidden: int = 16, **_) -> nn.Module:
    """The model alone: what a device needs (`task.model`); Flotilla seeds it."""
    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 2))
