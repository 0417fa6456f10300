"""``flotilla serve``: an experiment config with a ``network:`` section -> a :class:`FlotillaServer`.

The experiment layer reads the whole config; the network runtime below it takes plain specs
(:mod:`flotilla.experiment.specs`), settings and objects.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flotilla.algorithms import network_refusal
from flotilla.config import ConfigError
from flotilla.core.evaluate import eval_clients, evaluate
from flotilla.core.flat import FlatModel
from flotilla.experiment.init import apply_init
from flotilla.experiment.specs import client_spec, server_spec, staleness_spec
from flotilla.network.auth import TokenTable
from flotilla.network.coordinator import CoordinatorSettings
from flotilla.network.server import FlotillaServer, Limits, TLSFiles


def server_from_config(cfg, state_dir: str | Path | None = None) -> FlotillaServer:
    """A server for an :class:`~flotilla.config.ExperimentConfig` with a ``network:`` section:
    the task's model (seeded as in the simulator), its evaluation clients, the config's client,
    server-optimizer, sync (cohort) or async (FedBuff) settings.  An existing state directory
    is resumed."""
    from flotilla.tasks.registry import build_task

    net = cfg.network
    if net is None:
        raise ConfigError(
            "invalid config:\n  network: flotilla serve needs a network section (tls, tokens); see docs/deployment.md"
        )
    if cfg.fleet is not None:
        raise ConfigError(
            "invalid config:\n  fleet: describes a simulated fleet; flotilla serve trains real devices "
            "(set over-selection and deadlines under network:)"
        )
    if cfg.mode == "async" and cfg.async_.algorithm != "fedbuff":
        raise ConfigError(
            f"invalid config:\n  async.algorithm: the network server runs fedbuff, not {cfg.async_.algorithm}"
        )
    # FedProx and SCAFFOLD run over the network (the assignment carries client.algorithm; SCAFFOLD's c
    # rides with the download, delta c_i with the upload); an algorithm added later may not yet
    why = network_refusal(cfg.client.algorithm)
    if why is None and cfg.eval.personalize is not None:
        why = "eval.personalize: personalised evaluation is not wired into flotilla serve yet; remove it"
    if why is None and cfg.server.embedding_rows != "dense":
        why = f"server.embedding_rows: {cfg.server.embedding_rows} is simulated only; the wire carries dense deltas"
    if why:
        raise ConfigError(f"invalid config:\n  {why}")
    user = sample = None
    if cfg.privacy is not None:
        from flotilla.network.dp import network_user_level
        from flotilla.privacy import PrivacyError, PrivacySpec

        try:
            spec = PrivacySpec.from_dict(cfg.privacy.model_dump())
            sample = spec.sample_level  # DP-SGD on the devices: the assignment carries its settings
            if spec.user_level is not None:
                user = network_user_level(spec.user_level, cfg.privacy.user_level.amplification is not None)
        except PrivacyError as e:
            raise ConfigError(f"invalid config:\n  {e}") from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    a = cfg.async_
    try:
        settings = CoordinatorSettings(
            mode=cfg.mode,
            total_steps=cfg.rounds,
            seed=cfg.seed,
            weighting=cfg.weighting,
            cohort=cfg.cohort,
            over_selection=net.over_selection,
            min_updates=net.min_updates,
            round_deadline_s=net.round_deadline_s,
            selection_window_s=net.selection_window_s,
            secagg_stage_s=net.secagg_stage_s,
            assignment_timeout_s=net.assignment_timeout_s,
            max_update_norm=net.max_update_norm,
            max_update_abs=net.max_update_abs,
            max_examples=net.max_examples,
            retry_after_s=net.retry_after_s,
            **(
                {}
                if a is None
                else dict(
                    concurrency=a.concurrency,
                    buffer_size=a.buffer_size,
                    max_staleness=a.max_staleness,
                    normalize=a.normalize,
                    staleness=staleness_spec(cfg),
                )
            ),
        )
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  {e}") from None
    task = build_task(cfg.task, cfg.seed)
    apply_init(cfg, task.model)  # init: {checkpoint}: the server's initial model
    clients = eval_clients(task.dataset, cfg.eval.max_clients, cfg.seed)

    def evaluate_fn(flat: FlatModel, weights: torch.Tensor) -> dict[str, float]:
        if getattr(task, "evaluate", None) is not None:  # the task's own metrics (movielens: loss, AUC, AP)
            flat.load(weights)
            return task.evaluate(flat.model, task.dataset, clients, cfg.eval.batch_size)
        return evaluate(flat, weights, task.dataset, clients, task.loss_fn, cfg.eval.batch_size)

    if state_dir is None:
        state_dir = net.state_dir or Path(cfg.output.dir) / (cfg.output.name or f"{cfg.task.name}-serve")
    try:
        return _build_server(task, net, cfg, state_dir, settings, user, sample, evaluate_fn if clients else None)
    except ValueError as e:
        if cfg.privacy is None or type(e).__name__ != "PrivacyError":
            raise
        raise ConfigError(f"invalid config:\n  {e}") from None


def _build_server(task, net, cfg, state_dir, settings, user, sample, evaluate_fn) -> FlotillaServer:
    return FlotillaServer(
        task.model,
        tls=TLSFiles(net.tls.cert, net.tls.key, net.tls.ca, net.tls.require_client_cert),
        tokens=TokenTable.load(net.tokens),
        state_dir=state_dir,
        settings=settings,
        client=client_spec(cfg),
        server=server_spec(cfg),
        evaluate=evaluate_fn,
        eval_every=cfg.eval.every,
        limits=Limits.of(net),
        compression=net.compression,
        task=cfg.task.model_dump(mode="json"),
        config=cfg.model_dump(mode="json", by_alias=True),
        fsync=net.fsync,
        linger_s=net.linger_s,
        privacy=user,
        accountant=cfg.privacy.accountant if cfg.privacy is not None else "rdp",
        secure_buffer=cfg.secure_aggregation is not None and cfg.mode == "async",
        secure_masking=_masking(cfg),
        dp_sgd=sample,
        secure_max_norm=cfg.secure_aggregation.max_norm if cfg.secure_aggregation is not None else None,
        client_algorithm=cfg.client.algorithm,
        channels=cfg.channels,
        data_port=net.data_port,
        sealed_download_port=net.sealed_download_port,
        sealed_uploads=net.sealed_uploads,
    )


def _masking(cfg):
    """Sync secure aggregation's public parameters (flotilla.network.secagg.SecAggParams), or None."""
    sa = cfg.secure_aggregation
    if sa is None or cfg.mode != "sync":
        return None
    from flotilla.channels.ring import ring_quantize
    from flotilla.network.secagg import SecAggParams

    q = ring_quantize(cfg.channels)  # channels.upload quantize runs in the ring (flotilla/channels/ring.py)
    max_weight = 1.0 if cfg.weighting == "uniform" else float(sa.max_weight or cfg.network.max_examples)
    user = cfg.privacy.user_level if cfg.privacy is not None else None
    # the fixed-point range: with user-level DP a clipped delta's coordinates lie within clip_norm
    clip = sa.clip or (user.clip_norm if user is not None else 1.0)
    return SecAggParams(
        clip=clip,
        max_weight=max_weight,
        bits=sa.bits,
        degree=None if sa.degree == "full" else sa.degree,
        threshold=sa.threshold,
        max_request_bytes=int(cfg.network.max_message_mb * 2**20) - 1024,
        **({"quantize_bits": q[0], "stochastic": q[1]} if q else {}),
    )
