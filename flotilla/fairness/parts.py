"""From a validated ``tiers:`` section and a task to what the runtimes use: the tier of every client,
the fleet's per-tier multipliers, the optimisations as ``Components`` and the per-tier evaluation."""

from __future__ import annotations

import weakref

import numpy as np

from flotilla.core.protocols import Components
from flotilla.fairness.items import client_items
from flotilla.fairness.tiers import TIERS, assign_dirichlet, assign_random, check_nonempty


def assign(tiers_cfg, dataset, seed: int) -> np.ndarray:
    """The tier (0 low, 1 mid, 2 high) of every client of ``dataset``; refuses an empty tier."""
    if tiers_cfg.assignment == "random":
        tier = assign_random(dataset.num_clients)
    else:
        tier = assign_dirichlet(client_items(dataset, tiers_cfg.items), tiers_cfg.alpha, seed)
    check_nonempty(tier)
    return tier


def speed_multipliers(tiers_cfg) -> tuple[float, float, float]:
    if tiers_cfg.speed == "benchmarkme":
        from flotilla.fairness.speeds import benchmarkme_multipliers

        return benchmarkme_multipliers()
    return tuple(float(tiers_cfg.speed[n]) for n in TIERS)


def bandwidth_multipliers(tiers_cfg) -> tuple[float, float, float]:
    return tuple(float(tiers_cfg.bandwidth[n]) for n in TIERS)


def tier_parts(tiers_cfg, tier: np.ndarray, model, cohort: int | None) -> Components:
    """The optimisations of ``tiers_cfg`` as Components (empty when none is switched on)."""
    from flotilla.fairness.channel import TierChannel
    from flotilla.fairness.heterofl import HeteroFLMean, HeteroFLUpdate, tier_masks
    from flotilla.fairness.select import TierSampler

    sampler = None
    if tiers_cfg.exclude_low or tiers_cfg.over_select > 0:
        sampler = TierSampler(tier, exclude_low=tiers_cfg.exclude_low, over_select=tiers_cfg.over_select)
        if cohort is not None:
            sampler.check_cohort(cohort)
    channel = bool(tiers_cfg.quantize_bits or tiers_cfg.prune_keep)
    widths = tiers_cfg.heterofl_width or {}
    masks = tier_masks(model, widths) if any(w < 1 for w in widths.values()) else None  # refuses a non-MLP
    if not (channel or masks):
        return Components(sampler=sampler)

    def client_update(flat, loss_fn, spec):
        from flotilla.core.client import LocalTrainer

        update = LocalTrainer(flat, loss_fn, spec)
        if masks:
            update = HeteroFLUpdate(update, tier, masks)
        if channel:
            update = TierChannel(
                update, flat, tier, quantize_bits=tiers_cfg.quantize_bits, prune_keep=tiers_cfg.prune_keep
            )
        return update

    aggregator = (lambda numel: HeteroFLMean(numel, tier, masks)) if masks else None
    return Components(client_update=client_update, aggregator=aggregator, sampler=sampler)


# --- what the experiment layer calls (one line each in experiment/run.py, runtimes.py, compose.py) ---
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tier_map(cfg, dataset) -> np.ndarray | None:
    """The tier of every client for ``cfg`` (an ExperimentConfig), computed once per dataset; None without tiers."""
    t = cfg.tiers
    if t is None:
        return None
    key = (t.assignment, t.alpha, t.items, cfg.seed)
    per_dataset = _CACHE.setdefault(dataset, {})
    if key not in per_dataset:
        per_dataset[key] = assign(t, dataset, cfg.seed)
    return per_dataset[key]


def fleet_tiers(cfg, task):
    """The fleet's per-client speed / bandwidth multipliers, or None without tiers."""
    from flotilla.fleet.durations import TierMultipliers

    tier = tier_map(cfg, task.dataset)
    if tier is None:
        return None
    return TierMultipliers(tier, speed_multipliers(cfg.tiers), bandwidth_multipliers(cfg.tiers))


def tier_components(cfg, task) -> Components | None:
    """The tier optimisations as Components for build_algorithm, or None."""
    tier = tier_map(cfg, task.dataset)
    if tier is None or not cfg.tiers.optimisations():
        return None
    return tier_parts(cfg.tiers, tier, task.model, cfg.cohort if cfg.mode == "sync" and cfg.fleet is None else None)


def with_tier_metrics(evaluate_fn, cfg, task, algorithm, clients):
    """``evaluate_fn`` plus the per-tier metrics (``tier_low_accuracy``, ...) when the config has tiers."""
    tier = tier_map(cfg, task.dataset)
    if tier is None or evaluate_fn is None:
        return evaluate_fn
    from flotilla.fairness.evaluate import TierEvaluation

    per_tier = TierEvaluation(
        algorithm.flat,
        task.dataset,
        clients,
        task.loss_fn,
        tier,
        cfg.eval.batch_size,
        getattr(task, "evaluate", None),
    )
    return lambda w: {**evaluate_fn(w), **per_tier(w)}
