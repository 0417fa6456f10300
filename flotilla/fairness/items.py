"""What each client "holds" for the ``dirichlet`` tier assignment (RF^2's clicked items).

* ``labels``: the distinct labels of the client's training examples (Fashion-MNIST: the classes
  its images show; with a label-skewed partition clients of the same classes share a tier);
* ``plays``: the play a Shakespeare role speaks in (client names are ``"Play Title/ROLE"``), so
  all roles of a play share a tier;
* ``clicks``: the movies a MovieLens user clicked, in its training and test examples, as RF^2
  does (the movielens task's rows are ``[user, item, ...]`` with the click as ``y``);
* a dataset may bring its own: an attribute ``client_items`` (a list, or a method returning
  one, of item ids per client).

``auto`` picks the dataset's own items if it has them, else ``clicks`` for the movielens
dataset, ``plays`` when every client name has the ``Play/ROLE`` form, else ``labels``.
"""

from __future__ import annotations

import numpy as np
import torch

KINDS = ("auto", "labels", "plays", "clicks")


def label_items(dataset) -> list[list[int]]:
    out = []
    for c in range(dataset.num_clients):
        idx = dataset.train_indices[c]
        if len(idx) == 0:
            out.append([])
            continue
        _, y = dataset.fetch(idx)
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.dtype.is_floating_point:
            raise ValueError("tiers.items: labels needs one integer label per example; this task has none")
        out.append(np.unique(y.numpy()).tolist())
    return out


def play_items(dataset) -> list[list[int]]:
    names = [str(n) for n in dataset.client_names]
    if not all("/" in n for n in names):
        raise ValueError("tiers.items: plays needs client names 'Play/ROLE' (the shakespeare task)")
    plays: dict[str, int] = {}
    return [[plays.setdefault(n.rsplit("/", 1)[0], len(plays))] for n in names]


def click_items(dataset) -> list[list[int]]:
    if getattr(dataset, "name", None) != "movielens":
        raise ValueError("tiers.items: clicks needs the movielens task's dataset")
    out = []
    for c in range(dataset.num_clients):
        idx = torch.cat([dataset.train_indices[c], dataset.test_indices[c]])
        x, y = dataset.fetch(idx)
        out.append(np.unique(x[y > 0.5, 1].numpy()).tolist())
    return out


def client_items(dataset, kind: str = "auto") -> list[list[int]]:
    if kind not in KINDS:
        raise ValueError(f"tiers.items: must be one of {', '.join(KINDS)}, got {kind!r}")
    own = getattr(dataset, "client_items", None)
    if kind == "auto" and own is not None:
        items = own() if callable(own) else own
        if len(items) != dataset.num_clients:
            raise ValueError(f"the dataset's client_items has {len(items)} entries for {dataset.num_clients} clients")
        return [list(map(int, i)) for i in items]
    if kind == "clicks" or (kind == "auto" and getattr(dataset, "name", None) == "movielens"):
        return click_items(dataset)
    if kind == "plays" or (kind == "auto" and all("/" in str(n) for n in dataset.client_names)):
        return play_items(dataset)
    return label_items(dataset)
