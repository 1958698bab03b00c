"""Properties over random linear-Gaussian models, plate sizes, particle counts and
vectorization (hypothesis)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import mean_and_se
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_jc import JointContrastiveELBO, JointContrastiveIWELBO, JointContrastiveMeanFieldELBO
from pyro_jc.testing import LinearGaussianModel

SETTINGS = settings(max_examples=20, deadline=None)


@st.composite
def problems(draw):
    d = draw(st.integers(1, 3))
    m = draw(st.integers(1, 4))
    n = draw(st.integers(2, 8))
    batch = draw(st.integers(2, n))
    seed = draw(st.integers(0, 2**16))
    lg = LinearGaussianModel.random(d, m, sigma=draw(st.floats(0.3, 2.0)), seed=seed)
    x = lg.sample_data(seed, n)
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, d, generator=g, dtype=torch.float64)
    scale = 0.2 + torch.rand(d, generator=g, dtype=torch.float64)

    def guide(x, subsample_size=None):
        with pyro.plate("data", n, subsample_size=subsample_size) as idx:
            pyro.sample("z", dist.MultivariateNormal(loc[idx], scale_tril=torch.diag(scale)))

    return lg, x, batch, guide, loc, torch.diag(scale**2)


particles = st.tuples(st.integers(1, 4), st.booleans())


@SETTINGS
@given(problems(), particles)
def test_losses_finite_and_shapes_follow_plates(problem, particle_args):
    lg, x, batch, guide, _, _ = problem
    num_particles, vectorize = particle_args
    kwargs = dict(num_particles=num_particles, vectorize_particles=vectorize)
    for loss in (JointContrastiveELBO(**kwargs), JointContrastiveMeanFieldELBO(**kwargs)):
        value = loss.loss(lg.model, guide, x, batch)
        assert math.isfinite(value)
        assert loss.diagnostics["num_datapoints"] == x.shape[0]
    iw = JointContrastiveIWELBO(**kwargs)
    assert math.isfinite(iw.loss(lg.model, guide, x, batch))
    assert iw.log_evidence(lg.model, guide, x, batch).shape == (batch,)
    assert 1.0 <= iw.diagnostics["ess"] <= num_particles + 1e-6


@SETTINGS
@given(problems(), particles)
def test_rate_is_mutual_information_plus_marginal_kl(problem, particle_args):
    lg, x, batch, guide, _, _ = problem
    num_particles, vectorize = particle_args
    loss = JointContrastiveELBO(
        num_particles=num_particles, vectorize_particles=vectorize, estimate_information=True
    )
    loss.loss(lg.model, guide, x, batch)
    d = loss.diagnostics
    assert abs(d["rate"] - (d["mutual_information"] + d["marginal_kl"])) < 1e-6 * (
        1 + abs(d["rate"])
    )
    # The own term has weight 1/N in the aggregate posterior, so I_q(x; z) <= log N.
    assert d["mutual_information"] <= math.log(x.shape[0]) + 1e-9


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(problems(), st.integers(2, 4))
def test_vectorized_and_sequential_particles_agree_in_expectation(problem, num_particles):
    lg, x, _, guide, loc, cov = problem
    exact = -lg.elbo(x, loc, cov).sum().item()
    means = []
    for vectorize in (False, True):
        loss = JointContrastiveELBO(num_particles=num_particles, vectorize_particles=vectorize)
        values = [
            torch.tensor(loss.loss(lg.model, guide, x), dtype=torch.float64) for _ in range(150)
        ]
        mean, se = mean_and_se(values)
        assert abs(mean.item() - exact) < 4 * se.item() + 1e-9
        means.append((mean, se))
    (m1, s1), (m2, s2) = means
    assert abs(m1 - m2) < 4 * math.hypot(s1, s2) + 1e-9
