"""Differential privacy for Flotilla: sample-level DP-SGD on clients (Opacus), user-level
DP-FedAvg / DP-FedBuff on the server, and accounting with Opacus' RDP and PRV accountants.

See docs/privacy.md for the guarantees, the sampling assumptions and the numbers.
"""

from flotilla.privacy.accountant import PrivacyError, calibrate_noise, dpsgd_schedule, epsilon, max_steps
from flotilla.privacy.algorithm import (
    PrivacyParts,
    PrivacySpec,
    PrivateAlgorithm,
    UserLevelPlan,
    describe,
    make_private,
    plan_user_level,
    prepare_model,
)
from flotilla.privacy.fedbuff import DPFedBuff
from flotilla.privacy.sample import DPClientResult, DPLocalTrainer, SampleLevelSpec, make_dp_compatible
from flotilla.privacy.user import (
    AdaptiveClippingSpec,
    DPFedAvg,
    GaussianSumNoise,
    UserLevelSpec,
    delta_noise_multiplier,
    poisson_cohort,
)

__all__ = [
    "AdaptiveClippingSpec",
    "DPClientResult",
    "DPFedAvg",
    "DPFedBuff",
    "DPLocalTrainer",
    "GaussianSumNoise",
    "PrivacyError",
    "PrivacySpec",
    "PrivateAlgorithm",
    "SampleLevelSpec",
    "UserLevelPlan",
    "UserLevelSpec",
    "plan_user_level",
    "calibrate_noise",
    "delta_noise_multiplier",
    "describe",
    "dpsgd_schedule",
    "epsilon",
    "make_dp_compatible",
    "make_private",
    "max_steps",
    "poisson_cohort",
    "prepare_model",
    "PrivacyParts",
]
