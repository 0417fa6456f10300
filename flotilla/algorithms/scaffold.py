"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), option II.

Control variates: the server's ``c`` and one ``c_i`` per client (zero until the client first
reports).  A client starting from ``w_start`` takes K local steps with the corrected gradient

    g + c - c_i                                        (each local step)
    c_i+ = c_i - c + (w_start - w_end) / (K lr)        (option II)
    delta c_i = c_i+ - c_i

and the server, when it releases an aggregate of the updates S it accepted, moves the model as
FedAvg does (any server optimizer) and

    c <- c + (|S| / N) mean_{i in S}(delta c_i)  =  c + sum_{i in S}(delta c_i) / N.

How it plugs in (no change to the runtimes): the client update computes ``c_i+`` and ``delta c_i``
and holds them; the aggregator (sync rounds) or buffer (FedBuff) component around the runtime's
own commits them when it accepts that client's update (``c_i`` goes to the per-client store,
``delta c_i`` into a running sum), and updates ``c`` when it releases the aggregate.  An update
that is never accepted (no data, rejected, too stale) changes neither ``c_i`` nor ``c``, so
``c`` stays the mean of the stored ``c_i``.  The control-variate update is unweighted (as in the
paper) whatever ``weighting`` does to the model update.

In the asynchronous fleet a client's training is simulated when its trip ends, so it uses the
server's ``c`` of that moment (not of its download); its model is still the version it
downloaded.

State: ``c``, the pending sum and every stored ``c_i`` are checkpointed (``scaffold.*`` keys), so a
resumed run is bit-identical.  ``store: disk`` keeps the ``c_i`` in a file (flotilla.algorithms.store).

    client: {algorithm: {name: scaffold}}            # store: auto | memory | disk, store_dir: ...
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from flotilla.algorithms.base import ClientAlgorithm, Parts, Setting, not_composable
from flotilla.algorithms.store import DiskStore, MemoryStore, load_store_state, store_state
from flotilla.core.client import ClientResult, ClientSpec, LocalTrainer, LossFn
from flotilla.core.flat import FlatModel
from flotilla.core.protocols import Components, Shape
from flotilla.core.schema import Section
from flotilla.core.wrapper import AlgorithmWrapper

AUTO_DISK_BYTES = 1 << 30  # store: auto keeps the c_i on disk when population x model could exceed 1 GiB
_KEYS = ("scaffold.c", "scaffold.pending", "scaffold.pending_count", "scaffold.clients", "scaffold.values")


class ScaffoldConfig(Section):
    """SCAFFOLD (option II): client and server control variates correct the local steps."""

    name: Literal["scaffold"]
    store: Literal["auto", "memory", "disk"] = Field(
        "auto",
        description="where the clients' control variates live: memory, disk (a file of float32 rows), or auto "
        "(disk when population x model size exceeds 1 GiB)",
    )
    store_dir: str | None = Field(
        None, description="folder for the disk store's file (default: the system temp folder)"
    )


class ControlVariates:
    """The server's ``c``, the clients' ``c_i`` and the update held between training and acceptance."""

    def __init__(self, numel: int, population: int, store):
        self.numel, self.population, self.store = numel, population, store
        self.c = torch.zeros(numel)
        self.pending = torch.zeros(numel)  # sum of accepted delta c_i not yet released
        self.pending_count = 0
        self._held: int | None = None  # the client whose c_i+ / delta c_i are held
        self._held_ci = torch.empty(numel)
        self._held_dc = torch.empty(numel)

    def hold(self, client: int, ci: torch.Tensor, delta: torch.Tensor, k_lr: float) -> None:
        """After local training: ``c_i+ = c_i - c - delta / (K lr)`` (``delta = w_end - w_start``)."""
        torch.sub(ci, self.c, out=self._held_ci).sub_(delta, alpha=1.0 / k_lr)
        torch.sub(self._held_ci, ci, out=self._held_dc)
        self._held = client

    def drop(self) -> None:
        self._held = None

    def commit(self, client: int) -> None:
        """The aggregator accepted ``client``'s update: store its ``c_i+`` and add its ``delta c_i``."""
        if self._held != client:
            raise RuntimeError(
                f"SCAFFOLD: an update from client {client} was accepted, but the control variates held "
                f"are client {self._held}'s (the aggregator must see each update right after its training)"
            )
        self.store.put(client, self._held_ci)
        self.add(self._held_dc)
        self._held = None

    def add(self, delta_c: torch.Tensor) -> None:
        """An accepted client's ``delta c_i`` into the running sum (over the network the server gets it
        in the upload; the device keeps its own ``c_i``)."""
        self.pending.add_(delta_c)
        self.pending_count += 1

    # -- the device side over the network (flotilla.client.Device): one client, c from the download --
    def held_delta(self, client: int) -> torch.Tensor | None:
        """``delta c_i`` of ``client``'s last training (None if it took no step)."""
        return self._held_dc if self._held == client else None

    def keep(self, client: int) -> None:
        """The server accepted ``client``'s upload: its ``c_i+`` becomes its ``c_i`` (no running sum here)."""
        if self._held == client:
            self.store.put(client, self._held_ci)
            self._held = None

    def release(self) -> None:
        """The aggregate was released: ``c += sum(delta c_i) / N``."""
        if self.pending_count:
            self.c.add_(self.pending, alpha=1.0 / self.population)
            self.pending.zero_()
            self.pending_count = 0

    def discard(self) -> None:
        self.pending.zero_()
        self.pending_count = 0

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "scaffold.c": self.c.clone(),
            "scaffold.pending": self.pending.clone(),
            "scaffold.pending_count": torch.tensor(self.pending_count),
            **store_state(self.store, "scaffold."),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["scaffold.c"].shape != self.c.shape:
            raise ValueError(
                f"checkpoint scaffold.c has {state['scaffold.c'].numel()} values, the model has {self.numel}"
            )
        load_store_state(self.store, state, "scaffold.")
        self.c.copy_(state["scaffold.c"])
        self.pending.copy_(state["scaffold.pending"])
        self.pending_count = int(state["scaffold.pending_count"])
        self._held = None


class ScaffoldTrainer(LocalTrainer):
    """LocalTrainer whose every step first adds ``c - c_i`` to the gradient (a subclass: LocalTrainer's
    own loop is unchanged)."""

    def __init__(self, flat: FlatModel, loss_fn: LossFn, spec: ClientSpec, variates: ControlVariates):
        super().__init__(flat, loss_fn, spec)
        self.variates = variates
        self._ci = torch.zeros(flat.numel)
        self._correction = torch.zeros(flat.numel)

    def train(self, dataset, client: int, start: torch.Tensor, seed: int, delta_out: torch.Tensor) -> ClientResult:
        cv = self.variates
        cv.drop()
        if not cv.store.get(client, self._ci):
            self._ci.zero_()  # a client never seen: c_i = 0
        torch.sub(cv.c, self._ci, out=self._correction)
        r = super().train(dataset, client, start, seed, delta_out)
        if r.steps:
            cv.hold(client, self._ci, delta_out, r.steps * self.spec.lr)
        return r

    def _sgd_step(self) -> None:
        self.flat.grad.add_(self._correction)
        super()._sgd_step()


class _Forward:
    """Everything not overridden is the wrapped component's (count, buffer_size, full, state_dict...)."""

    def __init__(self, inner, variates: ControlVariates):
        self.inner, self.variates = inner, variates

    def __getattr__(self, name):
        if name in ("inner", "variates"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def result(self) -> torch.Tensor:
        out = self.inner.result()
        self.variates.release()
        return out


class ScaffoldAggregator(_Forward):
    """A round aggregator (WeightedMean) that also commits each accepted client's control variates."""

    def reset(self) -> None:
        self.inner.reset()
        self.variates.discard()

    def add(self, delta: torch.Tensor, weight: float, client: int) -> None:
        self.inner.add(delta, weight, client)
        self.variates.commit(client)


class ScaffoldBuffer(_Forward):
    """A FedBuff buffer that also commits each accepted (not too stale) client's control variates."""

    def reset(self) -> None:
        self.inner.reset()

    def add(self, delta: torch.Tensor, weight: float, tau: int, client=None) -> float:
        s = self.inner.add(delta, weight, tau, client)
        if s:
            self.variates.commit(client)
        return s


class ScaffoldAlgorithm(AlgorithmWrapper):
    """The built algorithm with the control variates in its checkpoints and two metrics."""

    def __init__(self, inner, variates: ControlVariates):
        super().__init__(inner)
        self.variates = variates

    def step(self) -> dict[str, Any]:
        record = self.inner.step()
        record.update(scaffold_c_norm=float(self.variates.c.norm()), scaffold_clients=len(self.variates.store))
        return record

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.inner.state_dict(), **self.variates.state_dict()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise ValueError(
                f"checkpoint has no SCAFFOLD state ({', '.join(missing)}): it was not written by a run "
                f"with client.algorithm: scaffold"
            )
        self.variates.load_state_dict(state)
        self.inner.load_state_dict({k: v for k, v in state.items() if not k.startswith("scaffold.")})

    def close(self) -> None:
        self.variates.store.close()
        self.inner.close()


class ScaffoldParts(Parts):
    def __init__(self, cfg: ScaffoldConfig, shape: Shape):
        self.cfg, self.shape = cfg, shape
        self.variates: ControlVariates | None = None
        self.accepts = False  # set when an aggregator or buffer that commits was built
        self.components = Components(
            client_update=self._client_update,
            aggregator=self._aggregator if shape.aggregation == "round" else None,
            buffer=self._buffer if shape.aggregation == "buffer" else None,
        )

    def _variates(self, numel: int) -> ControlVariates:
        if self.variates is None:
            kind = self.cfg.store
            if kind == "auto":
                kind = "disk" if self.shape.population * numel * 4 > AUTO_DISK_BYTES else "memory"
            store = DiskStore(numel, self.cfg.store_dir) if kind == "disk" else MemoryStore(numel)
            self.variates = ControlVariates(numel, self.shape.population, store)
        return self.variates

    def _client_update(self, flat, loss_fn, client_spec) -> ScaffoldTrainer:
        return ScaffoldTrainer(flat, loss_fn, client_spec, self._variates(flat.numel))

    def _aggregator(self, numel: int) -> ScaffoldAggregator:
        from flotilla.core.aggregate import WeightedMean

        self.accepts = True
        return ScaffoldAggregator(WeightedMean(numel), self._variates(numel))

    def _buffer(self, buffer, version_fn) -> ScaffoldBuffer:
        self.accepts = True
        return ScaffoldBuffer(buffer, self._variates(buffer.numel))

    def wrap(self, algorithm) -> ScaffoldAlgorithm:
        if self.variates is None or not self.accepts:
            raise ValueError(
                f"client.algorithm: scaffold: {self.shape.name} did not build the SCAFFOLD client update and "
                f"aggregator it was given"
            )
        return ScaffoldAlgorithm(algorithm, self.variates)


def _refuse(cfg: ScaffoldConfig, s: Setting) -> str | None:
    if s.sample_level_dp:
        return (
            "client.algorithm: scaffold corrects every local step with its control variates, and "
            "privacy.sample_level (DP-SGD) replaces the local step with its own; the two do not compose"
        )
    if s.user_level_dp:
        return (
            "client.algorithm: scaffold sends each client's control-variate change delta c_i to the server outside "
            "the clipping and noise of privacy.user_level, so the run would not be differentially private; remove one"
        )
    if s.secure_aggregation:
        return (
            "client.algorithm: scaffold needs each client's control-variate change delta c_i, which secure "
            "aggregation would hide (masking delta c_i with the update is not wired); remove one"
        )
    if s.aggregation == "per_update":
        return (
            "client.algorithm: scaffold updates the server control variate once per aggregate (a sync round or a "
            "FedBuff buffer); async.algorithm: fedasync applies every update on its own; use fedbuff"
        )
    return not_composable("scaffold", s, "trains and aggregates with its own components")


ALGORITHM = ClientAlgorithm(
    "scaffold",
    ScaffoldConfig,
    ScaffoldParts,
    _refuse,
    # over the network: c rides with the model download, delta c_i with the upload (flotilla/network/)
)
