"""Querying a trained amortized posterior: map, log_prob against the draws' density, a
posterior at fixed observations (sample, log_prob, to, pickle) and ArviZ export."""

import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import mean_and_se
from pyro.infer import SVI

from pyro_jc import AutoAmortizedFlow, AutoAmortizedNormal, ForwardKL, Posterior
from pyro_jc import optim as jc_optim
from pyro_jc.posterior import to_inference_data
from pyro_jc.testing import LinearGaussianModel


def scale_model(x):
    """A positive and a real latent: the mode of the positive one is not exp(mode of log)."""
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    m = pyro.sample("m", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(m, s).expand([3]).to_event(1), obs=x)


X = torch.tensor([0.3, 1.0, -0.4])


def perturbed(guide, x, scale=0.05, seed=0):
    """A set-up guide with parameters away from their initial values (a posterior that is
    not the prior's shape)."""
    guide(x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return guide


def trained(guide, model, x, steps=300):
    svi = SVI(model, guide, jc_optim.Adam({"lr": 3e-3}), ForwardKL(num_particles=128))
    for _ in range(steps):
        svi.step(x)
    return guide


def test_map_finds_the_exact_mode_of_the_normal_guide(device):
    """q(log s, m | x) is a diagonal normal N(mu, sd^2): the mode in the sites' own supports
    is m = mu_m and s = exp(mu_s - sd_s^2), for one observation and a batch of them."""
    x = X.to(device)
    guide = perturbed(AutoAmortizedNormal(scale_model), x)
    xs = torch.stack([x, x + 1.0, x * 2.0])
    levels = [0.15865525393145707, 0.5, 0.8413447460685429]
    q = guide.quantiles(levels, xs)
    mu_s, sd_s = q["s"][1].log(), (q["s"][2].log() - q["s"][0].log()) / 2
    mode = guide.map(xs)
    assert mode["s"].shape == (3,) and mode["m"].shape == (3,)
    assert torch.allclose(mode["s"], torch.exp(mu_s - sd_s**2), rtol=1e-3)
    assert torch.allclose(mode["m"], q["m"][1], atol=1e-3)
    with pytest.raises(ValueError, match="num_samples >= 1"):
        guide.map(x, num_samples=0)


def test_map_of_a_flow_is_the_maximum_of_its_density_on_a_grid():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 2.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.tensor(0.7)
    guide = trained(AutoAmortizedFlow(model, num_transforms=2), model, x)
    grid = torch.linspace(-8, 8, 16001)
    log_q = guide.log_prob({"z": grid}, x)
    mode = guide.map(x, num_steps=400)["z"]
    assert abs(mode - grid[log_q.argmax()]) < 0.01
    # The guide's parameters are left without gradients (training's next step unchanged).
    assert all(p.grad is None or not p.grad.abs().any() for p in guide.parameters())


@pytest.mark.parametrize("kind", ["normal", "flow"])
def test_log_prob_is_the_density_of_the_draws(kind):
    """log_prob integrates to one on a grid, and the draws of sample_posterior fall in bins
    in the proportions it gives (binomial error, 20,000 draws)."""

    def model(x):
        z = pyro.sample("z", dist.Gamma(2.0, 1.0))
        pyro.sample("x", dist.Poisson(z), obs=x)

    x = torch.tensor(3.0)
    guide = AutoAmortizedNormal(model) if kind == "normal" else AutoAmortizedFlow(model)
    guide = trained(guide, model, x)
    # On a grid of log z (density times the Jacobian z): mass near 0 and far out counted.
    log_grid = torch.linspace(-25.0, 8.0, 100001, dtype=torch.float64)
    grid = log_grid.exp()
    density = guide.log_prob({"z": grid.float()}, x).double().exp()
    assert torch.trapezoid(density * grid, log_grid).item() == pytest.approx(1.0, abs=2e-3)
    draws = guide.sample_posterior(x, num_samples=20000)["z"]
    edges = torch.quantile(draws, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        inside = (grid >= a) & (grid <= b)
        mass = torch.trapezoid((density * grid)[inside], log_grid[inside]).item()
        share = ((draws >= a) & (draws <= b)).float().mean().item()
        assert abs(mass - share) < 4 * math.sqrt(share * (1 - share) / 20000) + 2e-3


def plate_model(x):
    """A global latent vector in a model with a data plate."""
    m = pyro.sample("m", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("x", dist.Normal(m.sum(-1, keepdim=True), 1.0), obs=x)


def _cases(device):
    lg = LinearGaussianModel.random(2, 3, sigma=0.5, num_data=4, seed=0, device=device)
    g = torch.Generator().manual_seed(1)
    x3 = torch.randn(5, 3, generator=g).to(device)
    x4 = torch.randn(3, 4, generator=g).to(device)
    return {
        "two sites": (scale_model, x3[0], x3),  # (model, its data, several observations)
        "global in a plate": (plate_model, x4[0], x4),
        "local": (lg.model, lg.data, None),
    }


@pytest.mark.parametrize("kind", ["normal", "spline flow", "affine flow"])
@pytest.mark.parametrize("case", ["two sites", "global in a plate", "local"])
def test_sample_and_log_prob_gives_the_density_of_its_draws(kind, case, device):
    """The densities that come with the draws are log_prob's at them, for one observation
    and several, and no flow layer runs more often than for the draws alone."""
    model, x, xs = _cases(device)[case]
    if kind == "normal":
        guide = AutoAmortizedNormal(model)
    else:
        transform = "spline_autoregressive" if kind == "spline flow" else "affine_autoregressive"
        guide = AutoAmortizedFlow(model, transform=transform, num_transforms=2)
    guide = perturbed(guide, x, scale=0.1)
    fitted = guide.obs_standardize.is_fitted  # from the datapoints of the set-up call
    calls = []
    for module in guide.modules():
        module.register_forward_hook(lambda *_: calls.append(1))
    for obs in [x] if xs is None else [x, xs]:
        pyro.set_rng_seed(4)
        calls.clear()
        draws, log_q = guide.sample_and_log_prob(obs, num_samples=7)
        sampling_calls = len(calls)
        pyro.set_rng_seed(4)
        calls.clear()
        alone = guide.sample_posterior(obs, num_samples=7)
        assert len(calls) == sampling_calls  # the densities cost no pass of their own
        for name, value in alone.items():
            assert torch.equal(draws[name], value)
        leading = obs.shape[: obs.dim() - x.dim()]
        assert log_q.shape == (7,) + leading
        with torch.no_grad():
            expected = guide.log_prob(draws, obs)
        assert torch.allclose(log_q, expected, atol=1e-4, rtol=1e-5)
    # Asked about observations, log_prob never fits the standardization from them.
    assert guide.obs_standardize.is_fitted == fitted


def test_sample_and_log_prob_of_a_guide_with_the_bare_contract():
    """A guide with only sample_posterior and log_prob: its draws, then their log_prob."""

    class Bare:
        def __init__(self, guide):
            self.guide = guide

        def sample_posterior(self, *args, **kwargs):
            return self.guide.sample_posterior(*args, **kwargs)

        def log_prob(self, latents, *args, **kwargs):
            return self.guide.log_prob(latents, *args, **kwargs)

    lg, guide = trained_linear_gaussian()
    posterior = Posterior(Bare(guide), lg.data)
    pyro.set_rng_seed(2)
    draws, log_q = posterior.sample_and_log_prob(50)
    pyro.set_rng_seed(2)
    assert torch.equal(draws["z"], guide.sample_posterior(lg.data, num_samples=50)["z"])
    assert torch.equal(log_q, guide.log_prob(draws, lg.data))
    assert log_q.shape == (50,)
    with pytest.raises(TypeError, match="Posterior needs an amortized guide with a log_prob"):
        Posterior(type("NoDensity", (), {"sample_posterior": Bare.sample_posterior})(), lg.data)


def trained_linear_gaussian(device=None):
    lg = LinearGaussianModel.random(2, 3, sigma=0.5, num_data=1, seed=0, device=device)
    guide = AutoAmortizedNormal(lg.model)
    svi = SVI(lg.model, guide, jc_optim.Adam({"lr": 1e-2}), ForwardKL(num_particles=256))
    for _ in range(300):
        svi.step(lg.data)
    return lg, guide


def test_a_posterior_at_fixed_observations(device, tmp_path):
    lg, guide = trained_linear_gaussian(device)
    x_o = lg.sample_data(seed=5, num_data=1)
    posterior = Posterior(guide, x_o)
    draws = posterior.sample(4000)
    # z is local: a datapoint dim of 1.
    assert draws["z"].shape == (4000, 1, 2) and draws["z"].device.type == device.type
    mean, cov = lg.posterior_moments(x_o)
    got, se = mean_and_se(draws["z"].reshape(4000, 2))
    assert (got - mean.reshape(-1)).abs().max() < 4 * se.max() + 0.1
    assert torch.equal(posterior.log_prob(draws), guide.log_prob(draws, x_o))
    assert torch.allclose(posterior.median()["z"], guide.median(x_o)["z"])
    assert posterior.quantiles([0.5])["z"].shape == (1, 1, 2)
    assert torch.allclose(posterior.map()["z"], posterior.median()["z"], atol=1e-3)
    moved = posterior.to("cpu")
    assert moved.args[0].device.type == "cpu" and moved.sample(3)["z"].device.type == "cpu"
    with pytest.raises(TypeError, match="amortized guide"):
        Posterior(lambda x: None, x_o)


def test_a_posterior_pickles_with_its_guide():
    """Pickled, then loaded into an empty param store: the same posterior."""
    lg, guide = trained_linear_gaussian()
    posterior = Posterior(guide, lg.data)
    before = posterior.median()["z"]
    blob = pickle.dumps(posterior)
    pyro.clear_param_store()
    loaded = pickle.loads(blob)
    assert torch.allclose(loaded.median()["z"], before)


def test_inference_data_round_trips():
    pytest.importorskip("arviz")
    lg, guide = trained_linear_gaussian()
    posterior = Posterior(guide, lg.data)
    pyro.set_rng_seed(3)
    data = posterior.to_inference_data(num_samples=250, num_chains=4)
    pyro.set_rng_seed(3)
    draws = posterior.sample(1000)["z"]
    values = data.posterior["z"].values
    assert values.shape == (4, 250, 1, 2)
    assert torch.equal(torch.as_tensor(values).reshape(draws.shape), draws)
    assert torch.equal(torch.as_tensor(data.observed_data["x"].values), lg.data.cpu())
    with pytest.raises(ValueError, match="chains of equal length"):
        to_inference_data({"z": draws[:999]}, num_chains=4)


def test_a_flow_guide_pickles_and_keeps_training():
    """pickle.dumps(guide) works as for Pyro's PyroModules, and the pickled guide goes on
    computing the same posterior; the original keeps training."""

    lg = LinearGaussianModel.random(1, 2, num_data=1, seed=1)
    guide = AutoAmortizedFlow(lg.model, num_transforms=2)
    svi = SVI(lg.model, guide, jc_optim.Adam({"lr": 1e-2}), ForwardKL(num_particles=64))
    for _ in range(5):
        svi.step(lg.data)
    copy = pickle.loads(pickle.dumps(guide))
    assert torch.allclose(
        copy.log_prob({"z": torch.zeros(1, 1)}, lg.data),
        guide.log_prob({"z": torch.zeros(1, 1)}, lg.data),
    )
    assert math.isfinite(svi.step(lg.data))
