"""Hyperparameter tuning of Flotilla experiments with Optuna, under noisy federated evaluation.

``flotilla tune SPACE.yaml`` (:func:`flotilla.tune.tuning.tune`): see docs/tuning.md."""

from flotilla.tune.noisy_eval import NoiseConfig, NoisyEvaluation
from flotilla.tune.space import Space, TuneConfig, load_space
from flotilla.tune.study import StudyError
from flotilla.tune.tuning import tune

__all__ = ["NoiseConfig", "NoisyEvaluation", "Space", "StudyError", "TuneConfig", "load_space", "tune"]
