"""Diagnostics: SBC (exact and overconfident guides), the torch C2ST against sbibm's,
posterior predictive checks, plots."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_jc import AutoAmortizedFlow
from pyro_jc.diagnostics import c2st, posterior_predictive_check, sbc
from pyro_jc.diagnostics.sbc import _summarize
from pyro_jc.testing import LinearGaussianModel


def linear_gaussian(device=None):
    lg = LinearGaussianModel.random(2, 3, sigma=0.5, dtype=torch.float32, device=device or "cpu")

    def model(x):
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.A.T + lg.b, lg.sigma).to_event(1), obs=x)

    def exact_guide(scale=1.0):
        def guide(x):
            mean, cov = lg.posterior_moments(x)
            tril = scale * torch.linalg.cholesky(cov)
            with pyro.plate("data", x.shape[-2]):
                pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=tril))

        return guide

    return lg, model, exact_guide


def test_sbc_passes_for_the_exact_posterior_and_fails_when_overconfident(device):
    lg, model, exact_guide = linear_gaussian(device)
    x = torch.zeros(3, 3, device=device)  # 3 datapoints: 6 latent elements
    good = sbc(model, exact_guide(), x, num_simulations=1000, num_posterior_samples=99)
    bad = sbc(model, exact_guide(0.5), x, num_simulations=1000, num_posterior_samples=99)
    assert good.names == [f"z[{i}, {j}]" for i in range(3) for j in range(2)]
    assert good.ranks.shape == (1000, 6) and good.ranks.device.type == device.type
    assert good.passes(0.01) and not bad.passes(0.01)
    # Coverage: a calibrated guide's is the level within 4 binomial SEs (N = 1000, per
    # element); halving the scale drops the 90% interval to P(|N(0,1)| < 0.82) = 0.59.
    levels = torch.tensor(good.coverage_levels, device=device)
    se = (levels * (1 - levels) / 1000).sqrt()
    assert ((good.coverage - levels).abs() <= 4 * se + 1e-6).all()
    assert (bad.coverage[:, good.coverage_levels.index(0.9)] < 0.7).all()


def test_rank_test_p_values_are_uniform_under_the_null():
    # 400 sets of uniform ranks: the fraction of p-values below 0.05 is 0.05 within 4 SE.
    torch.manual_seed(0)
    ranks = torch.randint(0, 100, (500, 400))
    result = _summarize(ranks, [str(i) for i in range(400)], 99, 20, (0.9,))
    below = (result.p_values < 0.05).float().mean().item()
    assert abs(below - 0.05) < 4 * (0.05 * 0.95 / 400) ** 0.5


def test_sbc_of_a_discrete_latent_splits_ties():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(2.0 * c, 1.0), obs=x)

    def exact_guide(x):
        logit = torch.logit(torch.tensor(0.3)) + 2.0 * x - 2.0  # log N(x;2,1)/N(x;0,1) = 2x-2
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("c", dist.Bernoulli(logits=logit))

    result = sbc(model, exact_guide, torch.zeros(2), num_simulations=2000, num_posterior_samples=19)
    assert result.passes(0.01)


def test_sbc_runs_an_autoguide_in_batches_over_global_latents():
    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 0.3))
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("x", dist.Normal(loc, scale), obs=x)

    guide = AutoAmortizedFlow(model, num_transforms=1)
    x = torch.randn(5)
    guide(x)
    result = sbc(model, guide, x, num_simulations=60, num_posterior_samples=19, batch_size=25)
    assert result.names == ["loc", "scale"] and result.ranks.shape == (60, 2)
    assert ((result.ranks >= 0) & (result.ranks <= 19)).all()
    with pytest.raises(ValueError, match="does not divide"):
        sbc(model, guide, x, num_simulations=60, num_posterior_samples=19, num_bins=3)

    def no_scale(x):
        pyro.sample("loc", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"samples no site named \['scale'\]"):
        sbc(model, no_scale, x, num_simulations=10, num_posterior_samples=9)


@pytest.mark.slow
def test_c2st_reports_chance_for_equal_distributions(device):
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(4000, 3, generator=g), torch.randn(4000, 3, generator=g)
    accuracy = c2st(X.to(device), Y.to(device))
    assert accuracy.device.type == device.type
    assert abs(accuracy.item() - 0.5) < 0.02


def test_c2st_detects_a_shift_at_the_bayes_accuracy():
    # Two unit Gaussians 1.4 apart along one axis: Bayes accuracy Phi(0.7) = 0.758.
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4000, 2, generator=g)
    Y = torch.randn(4000, 2, generator=g) + torch.tensor([1.4, 0.0])
    assert c2st(X, Y).item() == pytest.approx(0.758, abs=0.02)
    with pytest.raises(ValueError, match="same dim"):
        c2st(X, Y[:, :1])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gaussian_shift", "two_moons_vs_gaussian"])
def test_c2st_matches_sbibm_on_the_same_samples(case):
    metrics = pytest.importorskip("sbibm.metrics")
    g = torch.Generator().manual_seed(2)
    if case == "gaussian_shift":
        X = torch.randn(3000, 2, generator=g)
        Y = torch.randn(3000, 2, generator=g) + torch.tensor([0.8, 0.3])
    else:  # a curved reference against its moment-matched Gaussian
        sbibm = pytest.importorskip("sbibm")
        X = sbibm.get_task("two_moons").get_reference_posterior_samples(num_observation=1)[:3000]
        Y = X.mean(0) + torch.randn(3000, 2, generator=g) @ torch.linalg.cholesky(torch.cov(X.T)).T
    ours, theirs = c2st(X, Y).item(), float(metrics.c2st(X, Y))
    assert ours == pytest.approx(theirs, abs=0.02)


def test_posterior_predictive_check_flags_heavy_tails():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):  # the exact posterior of mu
        precision = len(x) + 0.01
        pyro.sample("mu", dist.Normal(x.sum() / precision, precision**-0.5))

    statistics = {"mean": lambda v: v["x"].mean(), "sd": lambda v: v["x"].std()}
    torch.manual_seed(0)
    normal = torch.randn(200) + 3.0
    heavy = dist.StudentT(1.5).sample((200,)) + 3.0
    fit = posterior_predictive_check(model, guide, normal, statistics=statistics, num_samples=400)
    misfit = posterior_predictive_check(model, guide, heavy, statistics=statistics, num_samples=400)
    assert fit["sd"]["replicated"].shape == (400,)
    assert 0.01 < fit["mean"]["p_value"] < 0.99 and 0.01 < fit["sd"]["p_value"] < 0.99
    assert misfit["sd"]["p_value"] < 0.01  # replicated data are never as spread out
    with pytest.raises(ValueError, match="scalar per data set"):
        posterior_predictive_check(model, guide, normal, statistics={"x": lambda v: v["x"]})
    with pytest.raises(ValueError, match="at least one statistic"):
        posterior_predictive_check(model, guide, normal, statistics={})

    def unobserved(x):
        pyro.sample("mu", dist.Normal(0.0, 10.0))

    with pytest.raises(ValueError, match="no observed site"):
        posterior_predictive_check(unobserved, guide, normal, statistics=statistics)


def test_plots_draw(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from pyro_jc.diagnostics import plots

    lg, model, exact_guide = linear_gaussian()
    x = torch.zeros(1, 3)
    good = sbc(model, exact_guide(), x, num_simulations=200, num_posterior_samples=19)
    bad = sbc(model, exact_guide(0.5), x, num_simulations=200, num_posterior_samples=19)
    assert len(plots.plot_rank_histograms(good)) == 2
    ax = plots.plot_coverage({"exact": good, "scale halved": bad})
    ax.figure.savefig(tmp_path / "coverage.png")
    plots.plot_rank_ecdf(bad)
    fig = plots.plot_pairs(torch.randn(100, 2), torch.randn(100, 2))
    assert (tmp_path / "coverage.png").stat().st_size > 0 and len(fig.axes) == 4


def test_sbc_of_a_model_with_parameters_does_not_warn_about_training():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.5))
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):  # exact: precision 1 + n, mean (loc + sum x) / (1 + n)
        precision = 1.0 + x.shape[-1]
        loc = (0.5 + x.sum(-1, keepdim=x.dim() > 1)) / precision
        pyro.sample("z", dist.Normal(loc, precision**-0.5))

    result = sbc(model, guide, torch.zeros(3), num_simulations=500, num_posterior_samples=19)
    assert result.passes(0.01)  # and no UserWarning (warnings are errors in this suite)
