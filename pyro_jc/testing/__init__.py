"""Tools to test inference on your own models: models with exact posteriors
(:mod:`pyro_jc.testing.models`), hypothesis strategies that draw them
(:mod:`pyro_jc.testing.strategies`, needs hypothesis), and assertions."""

from .assertions import assert_calibrated, assert_posterior_moments_close
from .models import (
    BetaBernoulliModel,
    DiscreteLatentModel,
    ExactModel,
    GammaPoissonModel,
    LinearGaussianModel,
    gaussian_kl,
)

__all__ = [
    "BetaBernoulliModel",
    "DiscreteLatentModel",
    "ExactModel",
    "GammaPoissonModel",
    "LinearGaussianModel",
    "assert_calibrated",
    "assert_posterior_moments_close",
    "gaussian_kl",
]
