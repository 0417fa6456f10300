"""Channels in the simulators: a client update wrapped with download decoding and upload compression
(the runtime's round loop is untouched), and an algorithm wrapper for byte metrics and checkpointed
residuals.

Message sizes depend only on the model's shapes and the chain (flotilla.channels.codec), so the
fleet simulator accounts its own transfers (every trip downloads, every arrival uploads, including
trips it never trains because they dropped or came too stale) and its trip durations use the
compressed sizes; the synchronous in-process runtime gets cumulative ``bytes_up`` / ``bytes_down``
from :class:`ChannelsAlgorithm`.
"""

from __future__ import annotations

import torch

from flotilla.channels.config import ChannelsConfig
from flotilla.channels.device import DeviceChannels, ResidualStore
from flotilla.core.wrapper import AlgorithmWrapper

# Runtimes whose client updates run in this process with the components they are given.
SUPPORTED = ("SyncFedAvg", "SyncFleetSim", "AsyncFleetSim(fedbuff)", "AsyncFleetSim(fedasync)")


def refusal(cfg: ChannelsConfig, runtime: str, *, secure: bool, privacy: dict | None) -> str | None:
    """Why ``channels`` cannot run here (one line naming the key), or None."""
    if not cfg.upload and not cfg.download:
        return None
    if runtime not in SUPPORTED:
        return (
            f"channels: not supported by the {runtime} runtime yet (its clients train on workers or Ray actors, "
            "where the per-device residuals and byte accounting are not wired); use workers: 1 without "
            "runtime: ray, or remove channels"
        )
    if secure and cfg.upload:  # only quantize composes: into the ring (flotilla.channels.ring)
        from flotilla.channels.ring import secure_refusal

        why = secure_refusal(cfg, runtime)
        if why:
            return why
    user = (privacy or {}).get("user_level")
    if user is not None and user.get("adaptive_clipping") is not None and cfg.upload:
        return (
            "channels.upload: not with privacy.user_level.adaptive_clipping: the clipped-count bit is computed "
            "by the server from the update's norm, which compression changes; use a fixed clip_norm"
        )
    return None


def rows_refusal(mode: str, runtime: str, *, secure: bool = False, privacy: dict | None = None) -> str | None:
    """Why row-sparse uploads with channels cannot run here (one line naming the key), or None.  (The config
    refuses these too, flotilla.algorithms.rowwise.refusal; this guards the Python API.)"""
    if secure:
        return (
            f"server.embedding_rows: {mode} cannot run with secure_aggregation: the server sees only the masked sum, "
            "so devices cannot send their own row ids (and masks cover every coordinate)"
        )
    if privacy:
        return f"server.embedding_rows: {mode} cannot run with privacy: DP noise moves every embedding row"
    if runtime != "SyncFedAvg":
        return (
            f"server.embedding_rows: {mode} with channels: not on the {runtime} runtime: the fleet simulator times "
            "every trip with one upload size, and row-sparse uploads differ per device (use sync rounds without "
            "a fleet section, or server.embedding_rows: dense)"
        )
    return None


class ChannelClientUpdate:
    """Train from the decoded download; hand the aggregator what the server decodes from the upload."""

    def __init__(self, inner, channels: DeviceChannels, store: ResidualStore, numel: int):
        self.inner = inner
        self.channels = channels
        self.store = store
        self.downloads = self.uploads = 0
        self.bytes_up = 0  # exact: row-sparse uploads differ in size per device
        self._start = torch.empty(numel) if not channels.down.lossless else None

    def __getattr__(self, name):  # results, close(), ... of the wrapped update
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def train(self, dataset, client: int, weights: torch.Tensor, seed: int, out: torch.Tensor):
        start = weights
        if self._start is not None:
            start = self._start
            start.copy_(self.channels.down.apply(weights))
        self.downloads += 1
        r = self.inner.train(dataset, client, start, seed, out)
        if r.num_examples > 0:  # a client without data sends nothing (the runtimes skip it too)
            if self.channels.rows is not None or not self.channels.up.lossless:  # (fp32 arrives as it is)
                rows = dataset.embedding_rows(client) if self.channels.rows is not None else None
                data, sent, residual = self.channels.upload(out, seed, self.store.get(client), rows)
                if residual is not None:
                    self.store.put(client, residual)  # the device's memory: never part of the message
                out.copy_(sent)
                self.bytes_up += len(data)
            else:
                self.bytes_up += self.channels.upload_bytes
            self.uploads += 1
        return r


def client_update_factory(make_inner, cfg: ChannelsConfig, store: ResidualStore, clip_norm: float | None, tables=None):
    """A ``Components.client_update`` factory wrapping ``make_inner``'s update (``tables``: row-sparse
    uploads of those embedding tables, flotilla.channels.rows)."""

    def make(flat, loss_fn, spec):
        channels = DeviceChannels(cfg, flat.shapes, clip_norm, tables)
        return ChannelClientUpdate(make_inner(flat, loss_fn, spec), channels, store, flat.numel)

    return make


class ChannelsAlgorithm(AlgorithmWrapper):
    """Adds cumulative ``bytes_up`` / ``bytes_down`` (when the runtime does not count them itself) and
    checkpoints the error-feedback residuals, so a resumed run replays exactly."""

    def __init__(self, inner, store: ResidualStore, count_bytes: bool):
        super().__init__(inner)
        self.store = store
        self.count_bytes = count_bytes
        self.update = inner.trainer
        self.channels = self.update.channels

    def step(self):
        record = self.inner.step()
        if self.count_bytes:
            record["bytes_up"] = self.update.bytes_up
            record["bytes_down"] = self.update.downloads * self.channels.download_bytes
        if self.channels.error_feedback:
            record["residual_clients"] = len(self.store)
        return record

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.inner.state_dict()
        state["channels.messages"] = torch.tensor([self.update.downloads, self.update.uploads, self.update.bytes_up])
        for c, r in self.store.residuals.items():
            state[f"channels.residual.{c}"] = r.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = {k: v for k, v in state.items() if k.startswith("channels.")}
        self.inner.load_state_dict({k: v for k, v in state.items() if not k.startswith("channels.")})
        if "channels.messages" in mine:
            counts = [int(v) for v in mine["channels.messages"].tolist()]
            self.update.downloads, self.update.uploads = counts[:2]
            # (a checkpoint from before row-sparse uploads holds two counts: every upload was one size)
            self.update.bytes_up = counts[2] if len(counts) > 2 else counts[1] * self.channels.upload_bytes
        self.store.residuals = {
            int(k.removeprefix("channels.residual.")): v.clone()
            for k, v in mine.items()
            if k.startswith("channels.residual.")
        }


def compose(cfg, shape, components, *, privacy: dict | None, secure: bool, embedding_rows: str = "dense", model=None):
    """``(components with the client update wrapped, wrap(algorithm))`` for the experiment layer; raises
    ValueError with the reason where channels cannot run (:func:`refusal`).  With ``embedding_rows``
    sparse or rowwise (``model`` given) uploads are row-sparse (flotilla.channels.rows), the values
    through the upload chain."""
    from dataclasses import replace

    from flotilla.channels.config import as_channels
    from flotilla.core.client import LocalTrainer

    cfg = as_channels(cfg)
    why = refusal(cfg, shape.name, secure=secure, privacy=privacy)
    if why:
        raise ValueError(why)
    rows = embedding_rows != "dense"
    why = rows_refusal(embedding_rows, shape.name, secure=secure, privacy=privacy) if rows else None
    if why:
        raise ValueError(why)
    if secure and cfg.upload:  # the secure aggregator quantises into the ring (flotilla.channels.ring)
        from flotilla.channels.ring import compose as ring_compose

        return ring_compose(cfg, shape, components, ChannelClientUpdate, ChannelsAlgorithm)
    if not cfg.upload and not cfg.download and not rows:
        return components, lambda algorithm: algorithm
    tables = None
    if rows:
        from flotilla.algorithms.rowwise import layout

        tables = layout(model, shape.dataset.tables)
    user = (privacy or {}).get("user_level")
    clip_norm = float(user["clip_norm"]) if user is not None and cfg.upload else None
    store = ResidualStore()
    make = client_update_factory(components.client_update or LocalTrainer, cfg, store, clip_norm, tables)
    count_bytes = shape.name == "SyncFedAvg"  # the fleet simulators count transfers themselves
    return replace(components, client_update=make), lambda algorithm: ChannelsAlgorithm(algorithm, store, count_bytes)


def message_bytes(cfg, shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """``(download bytes, upload bytes)`` of one message with ``cfg`` (None: fp32 both ways)."""
    from flotilla.channels.config import as_channels

    cfg = as_channels(cfg) or ChannelsConfig()
    d = DeviceChannels(cfg, shapes)
    return d.download_bytes, d.upload_bytes
