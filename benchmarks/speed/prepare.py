"""Export each workload's data once, with Flotilla's own loaders, as .npy files every framework reads.

    .venv/bin/python benchmarks/speed/prepare.py --workload fmnist [--out benchmarks/out/data]

Fashion-MNIST: ``fashion_mnist_federated(partition="iid", num_clients=users, examples_per_client=k)``
(users x k images drawn without replacement, by seed).  Shakespeare: ``shakespeare_federated`` with
the natural (play, role) partition, roles with >= min_chars characters, each role's training
windows subsampled to ``per_user`` and its test windows to ``test_per_user`` (by seed).
Scale: only meta.json (the data is synthesised on demand by every framework).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORKLOADS  # noqa: E402


def prepare(workload: str, out: Path, overrides: dict | None = None) -> Path:
    meta = dict(WORKLOADS[workload], workload=workload, **(overrides or {}))
    meta["request"] = dict(meta)
    folder = out / workload
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "meta.json"
    if done.exists() and json.loads(done.read_text()).get("request") == meta["request"]:
        return folder
    if workload == "fmnist":
        from flotilla.data.fashion_mnist import fashion_mnist_federated, load_fashion_mnist

        data = fashion_mnist_federated(
            partition="iid", num_clients=meta["users"], examples_per_client=meta["per_user"], seed=meta["seed"]
        )
        x_train, y_train, x_test, y_test = load_fashion_mnist()
        idx = np.concatenate([i.numpy() for i in data.train_indices])
        np.save(folder / "x_train.npy", x_train[idx])
        np.save(folder / "y_train.npy", y_train[idx])
        np.save(folder / "x_test.npy", x_test)
        np.save(folder / "y_test.npy", y_test)
    elif workload == "shakespeare":
        from flotilla.data.shakespeare import VOCAB_SIZE, shakespeare_federated

        data = shakespeare_federated(
            seq_len=meta["seq_len"],
            min_chars=meta["min_chars"],
            max_train_samples_per_client=meta["per_user"],
            seed=meta["seed"],
        )
        rng = np.random.default_rng([meta["seed"], 7])
        test = []
        for t in data.test_indices:
            t = t.numpy()
            test.append(
                np.sort(rng.choice(t, meta["test_per_user"], replace=False)) if len(t) > meta["test_per_user"] else t
            )
        sizes = [len(i) for i in data.train_indices]
        np.save(folder / "stream.npy", data.text.stream)
        np.save(folder / "train_starts.npy", np.concatenate([i.numpy() for i in data.train_indices]))
        np.save(folder / "train_offsets.npy", np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        np.save(folder / "test_starts.npy", np.concatenate(test))
        np.save(folder / "test_offsets.npy", np.concatenate([[0], np.cumsum([len(t) for t in test])]).astype(np.int64))
        meta.update(users=len(sizes), vocab=VOCAB_SIZE)
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "out" / "data"))
    a = p.parse_args()
    print(prepare(a.workload, Path(a.out)))
