"""hypothesis strategies that draw random models with exact posteriors (needs hypothesis:
``pip install hypothesis``)."""

from __future__ import annotations

import torch

try:
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pyro_jc.testing.strategies needs hypothesis: pip install hypothesis "
        '(or pip install "pyro-jc[test]").'
    ) from e

from .models import BetaBernoulliModel, DiscreteLatentModel, GammaPoissonModel, LinearGaussianModel

_seeds = st.integers(0, 2**31 - 1)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


@st.composite
def linear_gaussian_models(draw, max_latent_dim=3, max_obs_dim=4, max_data=6):
    """:class:`~pyro_jc.testing.models.LinearGaussianModel` with random dimensions, design
    matrix, offset and noise scale (0.2 to 2)."""
    d = draw(st.integers(1, max_latent_dim))
    m = draw(st.integers(1, max_obs_dim))
    n = draw(st.integers(1, max_data))
    sigma = draw(st.floats(0.2, 2.0))
    seed = draw(_seeds)
    g = _generator(seed)
    A = torch.randn(m, d, generator=g) / d**0.5
    b = torch.randn(m, generator=g)
    return LinearGaussianModel(A, b, sigma, n, seed=seed)


@st.composite
def beta_bernoulli_models(draw, max_data=20):
    """:class:`~pyro_jc.testing.models.BetaBernoulliModel` with prior counts in 0.5..5."""
    a, b = draw(st.floats(0.5, 5.0)), draw(st.floats(0.5, 5.0))
    return BetaBernoulliModel(a, b, draw(st.integers(1, max_data)), seed=draw(_seeds))


@st.composite
def gamma_poisson_models(draw, max_data=20):
    """:class:`~pyro_jc.testing.models.GammaPoissonModel` with prior shape 0.5..5 and prior
    rate 0.2..3."""
    shape, rate = draw(st.floats(0.5, 5.0)), draw(st.floats(0.2, 3.0))
    return GammaPoissonModel(shape, rate, draw(st.integers(1, max_data)), seed=draw(_seeds))


@st.composite
def discrete_latent_models(draw, max_components=4, max_data=6):
    """:class:`~pyro_jc.testing.models.DiscreteLatentModel`: a Gaussian mixture with random
    weights, locations and scale, one categorical latent per datapoint."""
    k = draw(st.integers(2, max_components))
    seed = draw(_seeds)
    g = _generator(seed)
    weights = torch.rand(k, generator=g) + 0.1
    locs = 3.0 * torch.randn(k, generator=g)
    scale = draw(st.floats(0.3, 2.0))
    return DiscreteLatentModel(
        weights / weights.sum(), locs, scale, draw(st.integers(1, max_data)), seed=seed
    )


def exact_models():
    """Any of the above."""
    return st.one_of(
        linear_gaussian_models(),
        beta_bernoulli_models(),
        gamma_poisson_models(),
        discrete_latent_models(),
    )
