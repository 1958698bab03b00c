"""The amortized autoguides keep their state in Pyro's param store and answer the
amortized-posterior contract (log_prob, median, quantiles) exactly."""

import math
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import mean_and_se
from pyro.infer import SVI

from pyro_jc import AutoAmortizedFlow, AutoAmortizedNormal, ForwardKL, JointContrastiveELBO
from pyro_jc.testing import BetaBernoulliModel, LinearGaussianModel

PROBLEM = BetaBernoulliModel(2.0, 3.0, num_data=20, seed=0)
# The bound on a trained guide's posterior mean (posterior sd 0.09). After 300 steps of 100
# fresh pairs, seeds 0-11 read errors with an sd of 0.022 at a constant rate (0.015 with a
# decaying one): the amortization error of 30,000 simulations (4000 draws add 0.0015).
# Four of those sds; an untrained guide is off by 0.14 or more.
MEAN_TOLERANCE = 0.06


def _train(guide, steps, lr=1e-2):
    svi = SVI(PROBLEM.model, guide, pyro.optim.Adam({"lr": lr}), ForwardKL(num_particles=100))
    return [svi.step(PROBLEM.data) for _ in range(steps)]


def _posterior_mean(guide):
    return guide.sample_posterior(PROBLEM.data, num_samples=4000)["p"].mean().item()


def test_a_second_guide_trains_on_the_stored_parameters():
    """Without clearing the param store, a second guide of the same name computes with the
    stored (trained) parameters that SVI optimizes, as a second AutoNormal does. Before, it
    kept its own untrained tensors while SVI stepped the stored ones: it never learned."""
    exact = PROBLEM.posterior(PROBLEM.data)["p"]
    first = AutoAmortizedNormal(PROBLEM.model)
    _train(first, 300)
    second = AutoAmortizedNormal(PROBLEM.model)
    losses = _train(second, 100)
    assert _posterior_mean(second) == pytest.approx(exact.mean.item(), abs=MEAN_TOLERANCE)
    assert sum(losses[-20:]) / 20 < -0.5  # trained level (untrained: above 0)
    stored = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    assert {id(p) for p in second.parameters()} <= stored


def test_a_guide_of_another_shape_under_the_same_name_is_refused():
    AutoAmortizedNormal(PROBLEM.model)(PROBLEM.data)
    other = AutoAmortizedNormal(PROBLEM.model, hidden_dims=(8,))
    with pytest.raises(ValueError, match="param store holds .*clear_param_store"):
        other(PROBLEM.data)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["normal", "flow", "maf"])
def test_param_store_save_and_load_resume_in_a_fresh_process(kind, tmp_path):
    """Pyro's own save/load carries the parameters, the standardization statistics and the
    autoregressive layers' random orders: a fresh process that loads the store and calls the
    guide once samples the trained posterior and evaluates the trained loss."""
    script = textwrap.dedent(
        f"""
        import sys, pyro, torch
        import pyro.distributions as dist
        from pyro.infer import SVI
        from pyro_jc import AutoAmortizedFlow, AutoAmortizedNormal, ForwardKL
        from pyro_jc.testing import BetaBernoulliModel
        torch.set_num_threads(1)
        problem = BetaBernoulliModel(2.0, 3.0, num_data=20, seed=0)
        model, data, site = problem.model, problem.data, "p"
        if {kind!r} == "maf":  # three latent dims: the flow is a MAF with random orders
            def model(x):
                z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
                with pyro.plate("data", x.shape[0]):
                    pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
            data, site = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), "z"
        make = AutoAmortizedNormal if {kind!r} == "normal" else AutoAmortizedFlow
        # Another seed when loading: the autoregressive layers' random orders differ, and
        # the store must bring back the saved ones.
        pyro.set_rng_seed(1 if sys.argv[1] == "save" else 7)
        guide = make(model)
        loss = ForwardKL(num_particles=2000)
        svi = SVI(model, guide, pyro.optim.Adam({{"lr": 1e-2}}), loss)
        pyro.set_rng_seed(1)
        if sys.argv[1] == "save":
            for _ in range(300):
                svi.step(data)
            pyro.get_param_store().save(sys.argv[2])
        else:
            pyro.get_param_store().load(sys.argv[2])
            guide(data)
        pyro.set_rng_seed(2)
        mean = guide.sample_posterior(data, num_samples=4000)[site].mean().item()
        print(mean, svi.evaluate_loss(data))
        """
    )
    path = str(tmp_path / "params.pt")
    runs = [
        subprocess.run(
            [sys.executable, "-c", script, mode, path], capture_output=True, text=True, check=True
        )
        for mode in ("save", "load")
    ]
    (mean_saved, loss_saved), (mean_loaded, loss_loaded) = (
        [float(v) for v in run.stdout.split()] for run in runs
    )
    assert mean_loaded == mean_saved  # same parameters, same seed: the same draws
    assert loss_loaded == pytest.approx(loss_saved, abs=0.05)  # 2000 fresh pairs each
    if kind != "maf":  # an untrained guide reads 0.5 or so; the exact mean is 0.36
        exact = PROBLEM.posterior(PROBLEM.data)["p"].mean.item()
        assert mean_loaded == pytest.approx(exact, abs=MEAN_TOLERANCE)


@pytest.mark.parametrize("style", ["svi", "torch"])
def test_module_local_params_train(style):
    """Under Pyro's module_local_params the guide's state stays in the module (nothing in
    the global store): SVI captures its parameters, and so does Pyro's torch-style
    ``loss(model, guide)`` module with a torch optimizer."""
    exact = PROBLEM.posterior(PROBLEM.data)["p"].mean.item()
    with pyro.settings.context(module_local_params=True):
        guide = AutoAmortizedNormal(PROBLEM.model)
        # The rate decays (to 0.22 of its start) to damp the last iterate's step noise.
        if style == "svi":
            optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.995})
            svi = SVI(PROBLEM.model, guide, optim, ForwardKL(num_particles=100))
            for _ in range(300):
                svi.step(PROBLEM.data)
        else:
            loss = ForwardKL(num_particles=100)(PROBLEM.model, guide)
            loss(PROBLEM.data)  # sets the guide up
            optim = torch.optim.Adam(loss.parameters(), lr=1e-2)
            decay = torch.optim.lr_scheduler.ExponentialLR(optim, gamma=0.995)
            for _ in range(300):
                optim.zero_grad()
                loss(PROBLEM.data).backward()
                optim.step()
                decay.step()
        assert len(pyro.get_param_store()) == 0
        mean = _posterior_mean(guide)
    assert mean == pytest.approx(exact, abs=MEAN_TOLERANCE)


def _exact_normal_guide(lg, x):
    """An AutoAmortizedNormal for a one-dimensional linear-Gaussian latent whose identity
    embedding and head are set to the exact posterior N(c A'(x - b) / sigma^2, c)."""
    guide = AutoAmortizedNormal(lg.model, embedding=torch.nn.Identity(), init_scale=0.5)
    guide(x)  # set up (fits the observation standardization from x)
    mean, cov = lg.posterior_moments(x)
    c = cov.item()
    with torch.no_grad():
        m, s = guide.obs_standardize.mean, guide.obs_standardize.std
        w = c / lg.sigma**2 * lg.A[:, 0]
        guide.head.weight.zero_()
        guide.head.weight[0] = w * s
        guide.head.bias[0] = (w * (m - lg.b)).sum()
        guide.head.bias[1] = math.log(math.expm1(math.sqrt(c) - 1e-6))
    return guide, mean, c


def test_log_prob_median_and_quantiles_are_exact(device):
    lg = LinearGaussianModel.random(1, 3, device=device)
    x = lg.sample_data(1, 50)
    guide, mean, c = _exact_normal_guide(lg, x)
    z = torch.randn(7, 50, 1, dtype=x.dtype, device=device)
    exact = dist.Normal(mean, math.sqrt(c)).log_prob(z).sum((-2, -1))
    assert torch.allclose(guide.log_prob({"z": z}, x), exact, atol=1e-8)
    # A batch of data sets broadcasts against a batch of latents.
    xs = torch.stack([x, x + 1])
    assert guide.log_prob({"z": z[:, None]}, xs).shape == (7, 2)
    assert torch.allclose(guide.median(x)["z"].reshape(-1), mean.reshape(-1), atol=1e-8)
    q = guide.quantiles([0.1, 0.5, 0.9], x)["z"].reshape(3, -1)
    levels = torch.tensor([0.1, 0.5, 0.9], dtype=x.dtype, device=device)
    expected = mean.reshape(-1) + math.sqrt(c) * dist.Normal(0.0, 1.0).icdf(levels)[:, None]
    assert torch.allclose(q, expected, atol=1e-8)
    with pytest.raises(ValueError, match="missing \\['z'\\]"):
        guide.log_prob({}, x)
    with pytest.raises(ValueError, match="levels in \\(0, 1\\)"):
        guide.quantiles([1.5], x)


@pytest.mark.slow
def test_flow_quantiles_and_median_of_a_global_latent():
    guide = AutoAmortizedFlow(PROBLEM.model, num_transforms=2)
    _train(guide, 200)
    draws = guide.sample_posterior(PROBLEM.data, num_samples=20000)["p"].reshape(-1)
    q = guide.quantiles([0.25, 0.5, 0.75], PROBLEM.data, num_samples=20000)["p"]
    assert q.shape == (3,)
    # Two independent sets of 20000 draws: quantiles agree within a few Monte-Carlo errors.
    assert torch.allclose(q, torch.quantile(draws, torch.tensor([0.25, 0.5, 0.75])), atol=0.01)
    median = guide.median(PROBLEM.data)["p"]
    assert median.shape == () and abs(median - q[1]) < 0.02


def test_mutual_information_with_an_amortized_guide_matches_the_closed_form():
    """I(x; z) of the exact posterior of a one-dimensional linear-Gaussian latent is
    -log(c) / 2, c the posterior variance. Before, the guide's site scored every pair
    (z_i, x_j) with the density of its own (z_j, x_j), so the estimate read 0."""
    lg = LinearGaussianModel.random(1, 3)
    x = lg.sample_data(3, 4000)
    guide, _, c = _exact_normal_guide(lg, x)
    elbo = JointContrastiveELBO(estimate_information=True)
    estimates = []
    for _ in range(3):
        elbo.loss(lg.model, guide, x)
        estimates.append(elbo.diagnostics["mutual_information"])
    # As in test_information_terms_match_closed_form: 4 sd of the estimate is 0.07 nats.
    assert sum(estimates) / 3 == pytest.approx(-0.5 * math.log(c), abs=0.07)


def test_a_joint_density_refuses_to_score_one_site_alone():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(a + b, 1.0), obs=x)

    guide = AutoAmortizedNormal(model)
    elbo = JointContrastiveELBO(estimate_information=True)
    with pytest.raises(NotImplementedError, match="joint over the sites.*guide.log_prob"):
        elbo.loss(model, guide, torch.randn(8))


@pytest.mark.slow
def test_forward_kl_one_pair_at_a_time_trains_the_autoguide():
    """ForwardKL(vectorize_particles=False) runs model and guide once per pair, without the
    simulation plate: the guide's sites then take the model's unbatched shapes, and its
    standardization is fitted from all pairs of the step. Before, a global site kept its
    padding to the plate nesting and the loss refused the guide."""
    guide = AutoAmortizedNormal(PROBLEM.model)
    loss = ForwardKL(num_particles=10, vectorize_particles=False)
    svi = SVI(PROBLEM.model, guide, pyro.optim.Adam({"lr": 1e-2}), loss)
    for _ in range(300):
        svi.step(PROBLEM.data)
    exact = PROBLEM.posterior(PROBLEM.data)["p"].mean.item()
    assert _posterior_mean(guide) == pytest.approx(exact, abs=MEAN_TOLERANCE)


@pytest.mark.slow
def test_forward_kl_one_pair_at_a_time_estimates_the_vectorized_loss():
    guide = AutoAmortizedFlow(PROBLEM.model, num_transforms=2)
    _train(guide, 50)
    values = {}
    for vectorize in (True, False):
        loss = ForwardKL(num_particles=400, vectorize_particles=vectorize)
        values[vectorize] = [loss.loss(PROBLEM.model, guide, PROBLEM.data) for _ in range(5)]
    (m1, se1), (m2, se2) = (mean_and_se([torch.tensor(v) for v in values[k]]) for k in values)
    assert abs(m1 - m2) < 4 * math.hypot(se1, se2)


def test_forward_kl_inspects_the_model_once_per_model_and_argument_shapes():
    """One model run sets up a layout per model and argument shapes: a bound-method model
    is not inspected again at every step (it was: a new bound method is not `is` the old),
    and data of another size get a fresh layout instead of the first one's."""
    calls = []

    class Problem(BetaBernoulliModel):
        def model(self, x):
            calls.append(tuple(x.shape))
            super().model(x)

    problem = Problem(2.0, 3.0, num_data=10, seed=0)
    loss = ForwardKL(num_particles=500)
    for _ in range(3):
        loss.loss(problem.model, problem.guide, problem.data)
    assert calls == [(10,)] * 4  # the layout's run, then one simulation run per step
    more = BetaBernoulliModel(2.0, 3.0, num_data=40, seed=1).data
    calls.clear()
    value = loss.loss(problem.model, problem.guide, more)
    assert calls == [(40,), (40,)]
    # The exact posterior of 40 points: E_p[-log p(p | x)] over data sets of that size
    # (about -1.43 nats) is below that of 10 points (about -0.78).
    assert value < -1.2
