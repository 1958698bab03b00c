"""pyro_jc.testing: the strategies draw valid models whose exact posteriors agree with
importance sampling; the assertions pass on exact draws and fail on wrong ones; the exact
posterior guides are calibrated and make the ELBO exact."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_jc import JointContrastiveELBO
from pyro_jc.testing import (
    LinearGaussianModel,
    assert_calibrated,
    assert_posterior_moments_close,
)
from pyro_jc.testing.strategies import (
    beta_bernoulli_models,
    discrete_latent_models,
    exact_models,
    gamma_poisson_models,
    linear_gaussian_models,
)

NUM_IS = 200_000


def importance_moments(exact):
    """Posterior mean and variance of every latent (for categorical sites: category
    probabilities) by self-normalized importance sampling from the prior, with the
    effective sample size. Local latents are weighted per datapoint (their posterior
    factorizes), global ones by the whole data set."""
    x = exact.data
    with torch.no_grad(), pyro.plate("is", NUM_IS, dim=-2):
        trace = poutine.trace(exact.model).get_trace(x)
    trace.compute_log_prob()
    log_w = trace.nodes["x"]["log_prob"]  # (NUM_IS, N)
    results = {}
    for name in exact.latent_sites:
        local = exact.is_local(name)
        lw = log_w if local else log_w.sum(-1, keepdim=True)
        w = torch.softmax(lw, 0)  # over draws, per datapoint
        ess = 1.0 / w.pow(2).sum(0)
        z = trace.nodes[name]["value"]
        if isinstance(exact.posterior(x)[name], dist.Categorical):
            k = exact.posterior(x)[name].probs.shape[-1]
            onehot = torch.nn.functional.one_hot(z.expand(lw.shape).long(), k).to(w)
            results[name] = ((w.unsqueeze(-1) * onehot).sum(0), None, ess.unsqueeze(-1))
            continue
        if z.dim() == lw.dim() + 1:  # an event dim (the linear-Gaussian's z)
            w = w.unsqueeze(-1)
            ess = ess.unsqueeze(-1)
        mean = (w * z).sum(0)
        var = (w * (z - mean) ** 2).sum(0)
        results[name] = (mean.squeeze(0), var.squeeze(0), ess.squeeze(0))
    return results


@settings(max_examples=12, deadline=None)
@given(exact=exact_models())
def test_exact_posteriors_agree_with_importance_sampling(exact):
    torch.manual_seed(0)
    posterior = exact.posterior(exact.data)
    for name, (mean, var, ess) in importance_moments(exact).items():
        target = posterior[name]
        if var is None:  # categorical: probabilities, binomial error at the ESS
            probs = target.probs
            se = (probs * (1 - probs) / ess).sqrt()
            assert ((mean - probs).abs() <= 5 * se + 1e-3).all(), (exact, mean, probs)
            continue
        se = (target.variance / ess).sqrt()
        assert ((mean - target.mean).abs() <= 5 * se + 1e-4).all(), (exact, mean, target.mean)
        # The variance through its relative error ~ sqrt(2 / ESS) (near-Gaussian posteriors).
        assert ((var / target.variance - 1).abs() <= 5 * (2 / ess).sqrt() + 1e-3).all(), exact


@settings(max_examples=15, deadline=None)
@given(exact=exact_models(), seed=st.integers(0, 1000))
def test_exact_guide_makes_the_elbo_the_log_evidence(exact, seed):
    # With q(z|x) = p(z|x), log p(x,z) - log q(z|x) = log p(x) for every z: zero variance.
    losses = []
    for s in (seed, seed + 1):
        pyro.set_rng_seed(s)
        losses.append(JointContrastiveELBO().loss(exact.model, exact.guide, exact.data))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-3), exact


@pytest.mark.parametrize(
    "strategy",
    [
        linear_gaussian_models(),
        beta_bernoulli_models(),
        gamma_poisson_models(),
        discrete_latent_models(),
    ],
    ids=["linear_gaussian", "beta_bernoulli", "gamma_poisson", "discrete"],
)
def test_exact_guides_are_calibrated(strategy):
    @settings(max_examples=3, deadline=None)
    @given(exact=strategy)
    def check(exact):
        assert_calibrated(
            exact.model, exact.guide, exact.data, num_simulations=400, num_posterior_samples=19
        )

    check()


def test_assertions_accept_exact_draws_and_reject_wrong_ones():
    exact = LinearGaussianModel(torch.eye(2), torch.zeros(2), 0.5, 3, seed=1)
    posterior = exact.posterior(exact.data)
    draws = {"z": posterior["z"].sample((4000,))}
    assert_posterior_moments_close(draws, posterior)
    with pytest.raises(AssertionError, match="Site 'z': mean of element"):
        assert_posterior_moments_close({"z": draws["z"] + 0.1}, posterior)
    with pytest.raises(AssertionError, match="Site 'z': variance of element"):
        shrunk = posterior["z"].mean + 0.8 * (draws["z"] - posterior["z"].mean)
        assert_posterior_moments_close({"z": shrunk}, posterior)

    def overconfident(x):
        post = exact.posterior(x)["z"]
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.MultivariateNormal(post.mean, post.covariance_matrix / 4))

    with pytest.raises(AssertionError, match="not calibrated at level 0.01"):
        assert_calibrated(exact.model, overconfident, exact.data, num_simulations=500)


def test_expected_kl_of_a_linear_guide_is_the_average_over_the_evidence():
    """LinearGaussianModel.expected_kl (closed form, offset b != 0) against a Monte-Carlo
    average of the per-observation KL over x ~ p(x), within 5 standard errors."""
    from pyro_jc.testing import gaussian_kl

    problem = LinearGaussianModel.random(2, 3, sigma=0.7, seed=4)
    g = torch.Generator().manual_seed(1)
    weight = problem.gain + 0.3 * torch.randn(2, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, generator=g, dtype=torch.float64)
    tril = torch.tensor([[0.6, 0.0], [0.2, 0.4]], dtype=torch.float64)
    chol = torch.linalg.cholesky(problem.evidence_cov())
    x = problem.b + torch.randn(200_000, 3, generator=g, dtype=torch.float64) @ chol.T
    mean, cov = problem.posterior_moments(x)
    kl = gaussian_kl(x @ weight.T + bias, tril @ tril.T, mean, cov)
    exact = problem.expected_kl(weight, bias, tril).item()
    se = kl.std().item() / kl.numel() ** 0.5
    assert abs(kl.mean().item() - exact) < 5 * se and exact > 0.1
