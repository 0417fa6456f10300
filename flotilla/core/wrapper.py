"""A wrapper around a built algorithm that adds to it (privacy's accounting, SCAFFOLD's control
variates) and is itself an algorithm for the Runner: it delegates the rest to the wrapped one."""

from __future__ import annotations

import torch


class AlgorithmWrapper:
    def __init__(self, inner):
        self.inner = inner

    @property
    def round(self) -> int:
        return self.inner.round

    @property
    def weights(self) -> torch.Tensor:
        return self.inner.weights

    @property
    def flat(self):
        return self.inner.flat

    def __getattr__(self, name):  # anything else (sim clocks, dataset, ...) is the wrapped algorithm's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def step(self):
        return self.inner.step()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)

    def close(self) -> None:
        self.inner.close()
