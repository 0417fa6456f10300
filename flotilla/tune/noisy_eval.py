"""Noisy federated evaluation, as a tuner sees it (Kuo et al., MLSys 2023).

A tuner in federated learning does not see the model's error on all the data: it sees the
average error of the few evaluation clients that answered.  From per-client, per-example
correctness (:func:`flotilla.core.evaluate.client_correct`, one forward pass) this module makes
that value, with four noise sources that can be combined:

- **subsample**: ``clients`` (a count) or ``client_fraction`` of the evaluation clients answer
  (Kuo et al. used about 1%); a fresh draw at every evaluation.
- **data heterogeneity**: ``shuffle_fraction`` p re-deals a fraction p of the evaluation examples
  at random across the evaluation clients (p = 1: IID clients, the least noisy; p = 0: the
  partition as it is).  The deal is fixed for a trial.
- **systems bias**: a client answers with probability proportional to ``(1.0001 - its error)^b``
  (``bias`` b; b = 0 uniform; b > 0 favours clients the model does well on).
- **differential privacy**: Laplace noise of scale ``releases / (n_answering x epsilon)`` added to
  the uniform average of the answering clients' errors, then clipped to [0, 1].  ``releases`` is N,
  the number of noisy values published over the whole study (Kuo et al.: one per trial, 16); the
  sensitivity of an average of n values in [0, 1] is 1/n, and the budget is split over N releases.

Every draw is seeded from ``(seed, trial, round)``: the same trial sees the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from flotilla.core.schema import Section

BIAS_OFFSET = 1.0001  # Kuo et al.: (1.0001 - error)^b keeps a client with error 1 selectable


class NoiseConfig(Section):
    """What the tuner's evaluation suffers from (none given: the full evaluation, uniform over clients)."""

    clients: int | None = Field(None, ge=1, description="evaluation clients that answer each time (a count)")
    client_fraction: float | None = Field(
        None, gt=0, le=1, description="fraction of the evaluation clients that answer each time (Kuo et al.: 0.01)"
    )
    shuffle_fraction: float = Field(
        0.0, ge=0, le=1, description="fraction of evaluation examples re-dealt across clients (1 = IID clients)"
    )
    bias: float = Field(0.0, ge=0, description="b: a client answers with probability ~ (1.0001 - its error)^b")
    epsilon: float | None = Field(None, gt=0, description="Laplace DP on the averaged error with this epsilon")
    releases: int | None = Field(
        None, ge=1, description="N in the Laplace scale N / (n x epsilon) (default: trials x evaluations per trial)"
    )

    @model_validator(mode="after")
    def _one_size(self):
        if self.clients is not None and self.client_fraction is not None:
            raise ValueError("give clients (a count) or client_fraction, not both")
        return self


def subsample_size(noise: NoiseConfig, population: int) -> int:
    """How many evaluation clients answer: the count (at most all), the fraction rounded up, or all."""
    if noise.clients is not None:
        return min(noise.clients, population)
    if noise.client_fraction is not None:
        return max(1, math.ceil(noise.client_fraction * population - 1e-9))
    return population


def bias_probabilities(errors: np.ndarray, b: float) -> np.ndarray:
    """Probability of each client answering first: proportional to (1.0001 - error)^b."""
    w = np.power(BIAS_OFFSET - np.asarray(errors, dtype=np.float64), b)
    return w / w.sum()


def sample_clients(errors: np.ndarray, k: int, b: float, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct client positions, drawn one after another with the biased probabilities."""
    n = len(errors)
    if k >= n:
        return np.arange(n)
    return rng.choice(n, size=k, replace=False, p=bias_probabilities(errors, b) if b else None)


def laplace_scale(releases: int, answering: int, epsilon: float) -> float:
    """Laplace scale N / (n x epsilon): sensitivity 1/n of an n-client average, budget split over N releases."""
    return releases / (answering * epsilon)


def private_value(value: float, scale: float, rng: np.random.Generator) -> float:
    """``value`` + Laplace(scale) noise, clipped to [0, 1] (an error rate)."""
    return float(np.clip(value + rng.laplace(0.0, scale), 0.0, 1.0))


def reassign(sizes: Sequence[int], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The owning client (position) of each evaluation example after re-dealing ``fraction`` of them.

    Examples are in client order (client 0's, then client 1's...); the chosen ones swap owners by a
    random permutation among themselves, so every client keeps its number of examples."""
    owner = np.repeat(np.arange(len(sizes)), sizes)
    moved = int(round(fraction * len(owner)))
    if moved > 1:
        chosen = rng.choice(len(owner), size=moved, replace=False)
        owner[chosen] = owner[rng.permutation(chosen)]
    return owner


class NoisyEvaluation:
    """The tuner's error for one trial, from per-client correctness; the true error beside it."""

    def __init__(self, noise: NoiseConfig, sizes: Sequence[int], seed: int, trial: int, releases: int):
        self.noise = noise
        self.seed, self.trial = seed, trial
        self.sizes = list(sizes)
        self.k = subsample_size(noise, len(self.sizes))
        self.releases = releases
        self.owner = reassign(self.sizes, noise.shuffle_fraction, self._rng(-1, 1))

    def _rng(self, round_: int, tag: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.trial, round_ + 1, tag])

    def client_errors(self, correct: Sequence[torch.Tensor]) -> np.ndarray:
        """Per-client error after the re-deal (clients left with no example are skipped upstream)."""
        flat = torch.cat([c.to(torch.float64) for c in correct]).numpy() if correct else np.zeros(0)
        right = np.bincount(self.owner, weights=flat, minlength=len(self.sizes))
        return 1.0 - right / np.maximum(np.asarray(self.sizes), 1)

    def __call__(self, correct: Sequence[torch.Tensor], round_: int) -> dict[str, float]:
        sizes = [len(c) for c in correct]
        if sizes != self.sizes:
            raise ValueError(f"evaluation clients changed size: {sizes} vs {self.sizes}")
        errors = self.client_errors(correct)
        chosen = sample_clients(errors, self.k, self.noise.bias, self._rng(round_, 2))
        value = float(errors[chosen].mean())  # uniform average over answering clients (Kuo et al.)
        if self.noise.epsilon is not None:
            value = private_value(
                value, laplace_scale(self.releases, len(chosen), self.noise.epsilon), self._rng(round_, 3)
            )
        total = sum(self.sizes)
        true_error = 1.0 - float(sum(int(c.sum()) for c in correct)) / total
        return {"tuner_error": value, "true_error": true_error, "tuner_clients": float(len(chosen))}
