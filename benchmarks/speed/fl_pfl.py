"""pfl-research (``pfl``, PyTorch backend, simulated) on a speed-benchmark workload.

Runs in its own venv (benchmarks/.peers/pfl).  The set-up follows pfl's own PyTorch examples:
a ``FederatedDataset`` whose ``make_dataset_fn`` builds a user's ``Dataset`` on demand, the
``SimulatedBackend``, ``FederatedAveraging`` with a central SGD optimizer of lr 1.0, local
``torch.optim.SGD``.  pfl samples users at random (with replacement across rounds) and
iterates a user's data in order, so each user's examples are shuffled when its dataset is made.
The final model is evaluated with the same code as the bare loop (common.evaluate).

    benchmarks/.peers/pfl/bin/python benchmarks/speed/fl_pfl.py --data benchmarks/out/data/fmnist
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import base_args, emit, evaluate, load, make_model, round_stats  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.data.sampling import get_user_sampler  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics, Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402


class PflModule(nn.Module):
    """pfl wants ``loss`` and ``metrics`` on the module."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def loss(self, x, y, eval=False):
        self.eval() if eval else self.train()
        return F.cross_entropy(self.net(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=False):
        self.eval() if eval else self.train()
        out = self.net(x)
        return {
            "loss": Weighted(float(F.cross_entropy(out, y, reduction="sum")), len(y)),
            "accuracy": Weighted(float((out.argmax(1) == y).sum()), len(y)),
        }


class Stamps(TrainingProcessCallback):
    def __init__(self):
        self.stamps = []

    def on_train_begin(self, *, model):
        self.stamps.append(time.perf_counter())
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.stamps.append(time.perf_counter())
        return False, Metrics()


def main() -> None:
    args = base_args(__doc__).parse_args()
    logging.getLogger("pfl").setLevel(logging.WARNING)
    wl = load(args)
    m = wl.meta
    rng = np.random.default_rng([m["seed"], 0xF1])

    def make_dataset(uid):
        x, y = wl.user_data(int(uid))
        perm = torch.from_numpy(rng.permutation(len(y)))
        return Dataset(raw_data=[x[perm], y[perm]], user_id=uid)

    np.random.seed(m["seed"])
    train = FederatedDataset(make_dataset, get_user_sampler("random", np.arange(wl.num_users)))
    module = PflModule(make_model(m))
    model = PyTorchModel(
        model=module,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
    )
    backend = SimulatedBackend(training_data=train, val_data=None)
    stamps = Stamps()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=m["rounds"],
            evaluation_frequency=m["rounds"],
            train_cohort_size=m["cohort"],
            val_cohort_size=None,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=m["epochs"], local_learning_rate=m["lr"], local_batch_size=m["batch"]
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=1024),
        callbacks=[stamps],
    )
    ev = evaluate(module.net, wl.x_test, wl.y_test)
    stamps.stamps[-1] = time.perf_counter()  # the last round includes the final evaluation, as for the others
    emit({"framework": "pfl", **ev, "rounds": len(stamps.stamps) - 1, **round_stats(stamps.stamps)})


if __name__ == "__main__":
    main()
