"""Amortized autoguides: exact densities, support, layouts, training with both loss families."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive

from pyro_jc import (
    AutoAmortizedFlow,
    AutoAmortizedNormal,
    ForwardKL,
    JointContrastiveELBO,
    UnsupportedModelError,
)
from pyro_jc.nn import DeepSet
from pyro_jc.testing import LinearGaussianModel
from pyro_jc.transforms import SoftIntervalTransform, UnitBoxToInterval

GUIDES = {
    "normal": AutoAmortizedNormal,
    "maf": lambda m, **kw: AutoAmortizedFlow(m, num_transforms=2, **kw),
    "nsf": lambda m, **kw: AutoAmortizedFlow(m, transform="spline_coupling", **kw),
    "spline_ar": lambda m, **kw: AutoAmortizedFlow(m, transform="spline_autoregressive", **kw),
    "realnvp": lambda m, **kw: AutoAmortizedFlow(
        m, transform="affine_coupling", fast="sample", **kw
    ),
    "box": lambda m, **kw: AutoAmortizedFlow(
        m, transform="spline_autoregressive", interval_transform="box", **kw
    ),
}


def bounded_model(x):
    rate = pyro.sample("rate", dist.Uniform(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    probs = pyro.sample("probs", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("data", x.shape[-2]):
        loc = torch.cat([rate.unsqueeze(-1), scale.unsqueeze(-1), probs], -1)
        pyro.sample("x", dist.Normal(loc.unsqueeze(-2), 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("kind", GUIDES)
def test_replayed_density_equals_sampled_density(kind, device):
    """log q at the guide's own draws (flow caches) equals log q at the same values replayed
    (inverse transforms): the path ForwardKL takes."""
    x = torch.randn(4, 5, device=device)
    guide = GUIDES[kind](bounded_model)
    with torch.no_grad():
        with pyro.plate("sims", 3, dim=-2):
            trace = poutine.trace(guide).get_trace(x.expand(3, 4, 5))
        values = {k: trace.nodes[k]["value"] for k in ("rate", "scale", "probs")}
        with pyro.plate("sims", 3, dim=-2):
            replayed = poutine.trace(poutine.condition(guide, values)).get_trace(x.expand(3, 4, 5))
        trace.compute_log_prob()
        replayed.compute_log_prob()
    own = sum(s["log_prob"].sum() for s in trace.nodes.values() if s["type"] == "sample")
    again = sum(s["log_prob"].sum() for s in replayed.nodes.values() if s["type"] == "sample")
    assert torch.isfinite(own) and own.item() == pytest.approx(again.item(), abs=1e-3)


@pytest.mark.parametrize("kind", GUIDES)
def test_replayed_guide_draws_nothing(kind):
    """With every latent replayed (ForwardKL's path) the guide only evaluates its density: no
    random draw, hence no sampling pass through the flow (the slow direction of a MAF)."""
    x = torch.randn(4, 5)
    guide = GUIDES[kind](bounded_model)
    values = {k: guide(x)[k].detach() for k in ("rate", "scale", "probs")}
    state = torch.get_rng_state()
    trace = poutine.trace(poutine.condition(guide, values)).get_trace(x)
    trace.compute_log_prob()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.isfinite(trace.log_prob_sum())
    # ...while an unreplayed call does draw, and different calls give different draws.
    assert not torch.equal(guide(x)["rate"], guide(x)["rate"])


@pytest.mark.parametrize("kind", GUIDES)
def test_bounded_latents_never_leave_the_support(kind):
    guide = (
        GUIDES[kind](bounded_model, init_scale=3.0)
        if kind == "normal"
        else GUIDES[kind](bounded_model)
    )
    x = 10 * torch.randn(7, 4, 5)
    with pytest.raises(RuntimeError, match="first call"):
        guide.sample_posterior(x)
    guide(x[0])
    samples = guide.sample_posterior(x, num_samples=500)
    assert samples["rate"].shape == (500, 7, 1)  # sample, observation, data-plate dims
    assert ((samples["rate"] > 0) & (samples["rate"] < 1)).all()
    assert (samples["scale"] > 0).all()
    assert torch.allclose(samples["probs"].sum(-1), torch.ones(()))
    assert (samples["probs"] >= 0).all()


@pytest.mark.parametrize("kind", ["normal", "nsf"])
def test_soft_interval_latents_never_leave_a_box(kind):
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 5.0])

    def model(x):
        theta = pyro.sample("theta", dist.Uniform(low, high).to_event(1))
        pyro.sample("x", dist.Normal(theta, 0.1).to_event(1), obs=x)

    extra = {"init_scale": 30.0} if kind == "normal" else {}
    guide = GUIDES[kind](model, interval_transform="soft", **extra)
    x = torch.zeros(2)
    guide(x)
    transform = guide._latent_layout[0]["transform"]
    assert isinstance(transform.base_transform, SoftIntervalTransform)
    theta = guide.sample_posterior(100 * torch.randn(5, 2), num_samples=2000)["theta"]
    assert ((theta > low) & (theta < high)).all()
    assert (theta < low + 0.01).any() and (theta > high - 0.01).any()  # the bounds are reached


def test_soft_interval_covers_every_interval_constraint():
    guide = AutoAmortizedNormal(bounded_model, interval_transform="soft")
    C = torch.distributions.constraints
    for support in (C.unit_interval, C.interval(-2.0, 3.0), C.half_open_interval(0.0, 1.0)):
        assert isinstance(guide._unconstraining(support), SoftIntervalTransform)
    box = guide._unconstraining(C.independent(C.interval(torch.zeros(2), torch.ones(2)), 1))
    assert isinstance(box.base_transform, SoftIntervalTransform)
    # Other supports keep biject_to's map.
    assert guide._unconstraining(C.positive) == torch.distributions.biject_to(C.positive)


def test_interval_transform_is_checked():
    with pytest.raises(ValueError, match="interval_transform must be one of"):
        AutoAmortizedNormal(bounded_model, interval_transform="logit")
    with pytest.raises(ValueError, match="'box' ends a flow .* use AutoAmortizedFlow"):
        AutoAmortizedNormal(bounded_model, interval_transform="box")


def box_model(x):
    theta = pyro.sample("theta", dist.Uniform(torch.zeros(2), torch.ones(2)).to_event(1))
    pyro.sample("x", dist.Normal(theta, 0.1).to_event(1), obs=x)


def test_box_latents_never_leave_the_box():
    guide = GUIDES["box"](box_model)
    guide(torch.zeros(2))
    assert isinstance(guide._latent_layout[0]["transform"].base_transform, UnitBoxToInterval)
    assert guide.box_index.tolist() == [0, 1]
    for p in guide.parameters():  # a non-trivial flow and box layer
        torch.nn.init.normal_(p, std=0.3)
    theta = guide.sample_posterior(100 * torch.randn(5, 2), num_samples=2000)["theta"]
    assert ((theta > 0) & (theta < 1)).all()
    assert (theta < 0.01).any() and (theta > 0.99).any()  # the faces are reached


def test_box_layer_leaves_unbounded_coordinates_alone():
    """In a mixed layout the clamp and box spline act on the interval coordinates only:
    the draws of the unbounded sites are those of the same flow without them."""
    guide = GUIDES["box"](bounded_model)
    x = torch.randn(4, 5)
    guide(x)
    assert guide.box_index.tolist() == [0]  # "rate"; then "scale" and the simplex
    q = guide._posterior(guide._context((x,), {}))
    torch.manual_seed(3)
    u = q.rsample()
    torch.manual_seed(3)
    unclamped = dist.TransformedDistribution(q.base_dist, q.transforms[:-2]).rsample()
    assert torch.equal(u[..., 1:], unclamped[..., 1:])
    assert ((u[..., 0] > -1) & (u[..., 0] < 1)).all()


def test_box_standardization_is_fitted_before_the_clamp():
    """Prior draws reach the flow as the clamp's preimage, so the standardized latents of a
    uniform box prior have mean 0 and unit spread there (not in box coordinates)."""
    guide = GUIDES["box"](box_model)
    guide(torch.zeros(2))
    theta = dist.Uniform(torch.zeros(2), torch.ones(2)).sample((20000,))
    guide.standardize(latents={"theta": theta})
    v = guide._box_clamp().inv(2 * theta - 1)
    assert torch.allclose(guide.latent_standardize.mean, v.mean(0), atol=1e-4)
    assert torch.allclose(guide.latent_standardize.std, v.std(0), rtol=1e-3)
    assert (v.std(0) > (2 * theta - 1).std(0) * 1.01).all()  # the preimage is wider


@pytest.mark.slow
def test_box_density_integrates_to_one_in_two_dimensions():
    guide = GUIDES["box"](box_model, num_transforms=2)
    x = torch.tensor([0.9, 0.5])
    guide(x)
    guide.standardize(latents={"theta": dist.Uniform(torch.zeros(2), 1.0).sample((4000,))})
    for p in guide.parameters():
        torch.nn.init.normal_(p, std=0.1)
    edge = torch.linspace(5e-4, 1 - 5e-4, 1001)
    grid = torch.cartesian_prod(edge, edge)
    with torch.no_grad(), pyro.plate("grid", len(grid)):
        trace = poutine.trace(poutine.condition(guide, {"theta": grid})).get_trace(x)
    trace.compute_log_prob()
    log_q = sum(s["log_prob"] for s in trace.nodes.values() if s["type"] == "sample")
    q = log_q.exp().reshape(1001, 1001)
    integral = torch.trapezoid(torch.trapezoid(q, edge), edge)
    # The grid stops short of the faces, where the clamp piles the flow's tails: compare with
    # the fraction of the guide's own draws that fall on the grid (MC s.e. below 0.002).
    theta = guide.sample_posterior(x, num_samples=100000)["theta"]
    on_grid = ((theta > edge[0]) & (theta < edge[-1])).all(-1).float().mean()
    assert 0.9 < on_grid < 0.999  # the test covers mass near the faces
    assert integral.item() == pytest.approx(on_grid.item(), abs=0.01)


@pytest.mark.parametrize(
    "transform, interval",
    [
        ("spline_coupling", "sigmoid"),
        ("affine_autoregressive", "sigmoid"),
        ("spline_coupling", "soft"),
        ("spline_autoregressive", "box"),
    ],
)
def test_density_integrates_to_one_on_a_bounded_support(transform, interval):
    def model(x):
        r = pyro.sample("r", dist.Beta(2.0, 2.0))
        pyro.sample("x", dist.Normal(r, 0.1), obs=x)

    guide = AutoAmortizedFlow(model, transform=transform, interval_transform=interval)
    x = torch.tensor(0.3)
    guide(x)  # setup
    # As ForwardKL does: latents standardized from prior draws (unstandardized, the soft map
    # would put half the mass within 1e-4 of the bounds, off the grid).
    guide.standardize(latents={"r": dist.Beta(2.0, 2.0).sample((4000,))})
    for p in guide.parameters():  # a non-trivial flow, not the identity at init
        torch.nn.init.normal_(p, std=0.05)
    grid = torch.linspace(1e-4, 1 - 1e-4, 4001)
    with torch.no_grad(), pyro.plate("grid", len(grid)):
        trace = poutine.trace(poutine.condition(guide, {"r": grid})).get_trace(x)
    trace.compute_log_prob()
    log_q = sum(s["log_prob"] for s in trace.nodes.values() if s["type"] == "sample")
    integral = torch.trapezoid(log_q.exp(), grid)
    assert integral.item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
def test_forward_kl_flow_recovers_correlated_posterior():
    torch.manual_seed(0)
    lg = LinearGaussianModel.random(2, 2, sigma=0.3, dtype=torch.float32)
    lg.A = torch.tensor([[1.0, 1.0], [0.0, 0.3]])  # strongly correlated posterior

    def model(x):
        z = pyro.sample("z", lg.prior(x))
        pyro.sample("x", dist.Normal(z @ lg.A.T + lg.b, lg.sigma).to_event(1), obs=x)

    x_obs = lg.sample_data(2, 1)[0]
    guide = AutoAmortizedFlow(model, num_transforms=3)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-3}), ForwardKL(num_particles=256))
    for _ in range(1500):
        svi.step(x_obs)
    x_test = lg.sample_data(5, 3)
    mean, cov = lg.posterior_moments(x_test)
    z = guide.sample_posterior(x_test, num_samples=4000)["z"]
    assert z.shape == (4000, 3, 2)
    sd = cov.diagonal().sqrt()
    assert (((z.mean(0) - mean) / sd).abs() < 0.25).all()  # amortization error after training
    for i in range(3):
        emp = torch.cov(z[:, i].T)
        assert torch.allclose(emp.diagonal().sqrt(), sd, rtol=0.15)
        corr = emp[0, 1] / emp.diagonal().prod().sqrt()
        assert corr.item() == pytest.approx((cov[0, 1] / sd.prod()).item(), abs=0.1)


@pytest.mark.slow
def test_set_embedding_for_iid_observations():
    # z ~ N(0, 1), x_i ~ N(z, 1), n = 8: posterior N(sum x / 9, 1 / 9).
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x_obs = torch.zeros(8)
    guide = AutoAmortizedNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), ForwardKL(num_particles=256))
    for _ in range(3000):
        svi.step(x_obs)
    torch.manual_seed(1)
    x_test = torch.randn(5, 8) * 1.5
    z = guide.sample_posterior(x_test, num_samples=4000)["z"]
    assert z.shape == (4000, 5, 1)
    assert torch.allclose(z.mean(0).squeeze(-1), x_test.sum(-1) / 9, atol=0.1)
    assert torch.allclose(z.std(0), torch.full((5, 1), 1 / 3), rtol=0.1)
    # Permuting the set changes nothing.
    perm = x_test[:, torch.randperm(8)]
    assert torch.allclose(guide._context((x_test,), {}), guide._context((perm,), {}), atol=1e-5)


@pytest.mark.slow
def test_local_latents_with_joint_contrastive_elbo(device):
    # z_i ~ N(0, 1), x_i ~ N(z_i, 0.5^2): posterior N(0.8 x_i, 0.2) per datapoint.
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), device=x.device), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    torch.manual_seed(0)
    x = torch.randn(200, device=device) * 1.2
    guide = AutoAmortizedNormal(model)
    loss = JointContrastiveELBO(num_particles=4, vectorize_particles=True)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.996}), loss)
    for _ in range(800):
        svi.step(x)
    z = guide.sample_posterior(x[:10], num_samples=4000)["z"]
    assert z.device.type == device.type and z.shape == (4000, 10)
    assert torch.allclose(z.mean(0), 0.8 * x[:10], atol=0.05)
    assert torch.allclose(z.std(0), torch.full((10,), math.sqrt(0.2), device=device), rtol=0.06)


def test_predictive_and_custom_embedding():
    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    embedding = torch.nn.Sequential(torch.nn.Linear(1, 7), torch.nn.Tanh())
    guide = AutoAmortizedFlow(model, embedding=embedding, num_transforms=1)
    x = torch.zeros(1)
    draws = Predictive(model, guide=guide, num_samples=11, return_sites=["z"])(x)
    assert draws["z"].shape == (11, 2)
    # The embedding is trained with the guide: its parameters are in the param store.
    names = set(pyro.get_param_store().keys())
    assert any("embedding" in n for n in names)


def test_mixed_and_discrete_latents_are_refused():
    def mixed(x):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(g, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(UnsupportedModelError, match="mixes global.*'g'.*local.*'z'"):
        AutoAmortizedNormal(mixed)(torch.zeros(3))

    def discrete(x):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(UnsupportedModelError, match="'z' is discrete"):
        AutoAmortizedNormal(discrete)(torch.zeros(()))
    with pytest.raises(ValueError, match="transform must be one of"):
        AutoAmortizedFlow(discrete, transform="planar")


def test_parameters_are_listed_again_when_a_child_module_changes():
    guide = AutoAmortizedFlow(bounded_model, num_transforms=1)
    x = torch.randn(4, 5)
    guide(x)
    stored = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    assert {id(p) for p in guide.parameters()} <= stored
    # e.g. a user's own embedding
    guide.embedding = DeepSet(5, (8,), guide.context_dim)
    assert guide._param_names is None
    pyro.clear_param_store()
    guide(x)
    stored = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    assert {id(p) for p in guide.parameters()} <= stored


def test_standardize_fits_once_and_follows_its_state(device):
    from pyro_jc.nn import Standardize

    s = Standardize(3).to(device)
    x = torch.randn(500, 3, device=device) * torch.tensor([2.0, 0.5, 0.0], device=device) + 1.0
    assert not s.is_fitted and torch.equal(s(x), x)  # the identity until fitted
    unfitted = {k: v.clone() for k, v in s.state_dict().items()}
    with pytest.warns(UserWarning, match="1 of 3 features are constant"):
        s.fit(x)
    assert s.is_fitted
    y = s(x)
    assert torch.allclose(y[:, :2].mean(0), torch.zeros(2, device=device), atol=1e-5)
    assert torch.allclose(y[:, :2].std(0), torch.ones(2, device=device), atol=1e-5)
    assert s.std[2] == 1.0  # a constant feature keeps unit scale
    s.load_state_dict(unfitted)
    assert not s.is_fitted and torch.equal(s(x), x)


@pytest.mark.slow
def test_box_guide_recovers_a_posterior_cut_by_the_box():
    """theta ~ U(0, 1)^2, x ~ N(theta, 0.1^2): at x = (1, 0.5) the first coordinate's
    posterior is a normal cut at its mean by the bound (mean 1 - 0.1 sqrt(2/pi), sd
    0.1 sqrt(1 - 2/pi)); the second is N(0.5, 0.1^2)."""
    pyro.set_rng_seed(0)
    guide = AutoAmortizedFlow(
        box_model, transform="spline_autoregressive", num_transforms=2, interval_transform="box"
    )
    svi = SVI(box_model, guide, pyro.optim.Adam({"lr": 3e-3}), ForwardKL(num_particles=512))
    x_obs = torch.tensor([1.0, 0.5])
    for _ in range(1500):
        svi.step(x_obs)
    theta = guide.sample_posterior(x_obs, num_samples=20000)["theta"]
    mean = torch.tensor([1 - 0.1 * math.sqrt(2 / math.pi), 0.5])
    sd = torch.tensor([0.1 * math.sqrt(1 - 2 / math.pi), 0.1])
    # MC error of the moments is under 1% of sd: the bounds are the amortization error.
    assert (((theta.mean(0) - mean) / sd).abs() < 0.25).all()
    assert torch.allclose(theta.std(0), sd, rtol=0.1)
    assert theta[:, 0].max() < 1


def test_box_guide_density_of_its_own_draws_and_replayed_values_agree():
    """Two box coordinates (the autoregressive box layer): log q at the guide's draws equals
    log q at the same values replayed, and the draws are differentiable in the box layer's
    parameters (reparameterized ELBOs)."""
    # In float64, with random layers of weights of sd 0.05: a draw within the dtype's
    # resolution of a face has lost its pre-image, and the inverse map (the replayed path)
    # cannot recover it. Weights of sd 0.2 put such draws in most seeds (in float64 too,
    # log q off by up to 5.5 nats); with 0.05 seeds 0-7 agree to 2e-5 over 300 draws each.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        guide = GUIDES["box"](box_model)
        # a batch of 300 observations
        x = torch.tensor([[0.9, 0.2], [0.1, 1.0], [0.5, 0.5]]).repeat(100, 1)
        guide(x[0])  # set up with the model's own arguments: one observation
        for p in guide.parameters():
            torch.nn.init.normal_(p, std=0.05)
        trace = poutine.trace(guide).get_trace(x)
        theta = trace.nodes["theta"]["value"]
        replayed = poutine.trace(poutine.condition(guide, {"theta": theta.detach()})).get_trace(x)
    finally:
        torch.set_default_dtype(default)
    trace.compute_log_prob()
    replayed.compute_log_prob()
    own, again = trace.nodes["theta"]["log_prob"], replayed.nodes["theta"]["log_prob"]
    assert theta.shape == (300, 2) and theta.dtype == torch.float64
    assert torch.isfinite(own).all()
    assert torch.allclose(own, again, rtol=0, atol=1e-3)
    theta.sum().backward()
    assert guide.box_layer.conditioner.layers[-1].weight.grad.abs().sum() > 0


def _zuko_builder(**kwargs):
    zuko = pytest.importorskip("zuko")
    return lambda f, c: zuko.flows.NSF(f, c, transforms=2, hidden_features=(32, 32), **kwargs)


def test_a_zuko_flow_scores_its_own_draws_and_replayed_values_alike():
    """flow=: any conditional flow (zuko's here) over the standardized unconstrained
    latents, with the support maps around it: bounded draws stay inside, and the density
    of the guide's draws equals the density of the same values replayed."""
    guide = AutoAmortizedFlow(bounded_model, flow=_zuko_builder())
    x = torch.randn(4, 5)
    with torch.no_grad():
        with pyro.plate("sims", 3, dim=-2):
            trace = poutine.trace(guide).get_trace(x.expand(3, 4, 5))
        values = {k: trace.nodes[k]["value"] for k in ("rate", "scale", "probs")}
        assert ((values["rate"] > 0) & (values["rate"] < 1)).all()
        assert (values["scale"] > 0).all()
        with pyro.plate("sims", 3, dim=-2):
            replayed = poutine.trace(poutine.condition(guide, values)).get_trace(x.expand(3, 4, 5))
        trace.compute_log_prob()
        replayed.compute_log_prob()
    own, again = trace.log_prob_sum(), replayed.log_prob_sum()
    assert torch.isfinite(own) and own.item() == pytest.approx(again.item(), abs=1e-3)
    # Its parameters reach the param store, as the built-in layers' do.
    assert any(".flow$$$" in name for name in pyro.get_param_store().keys())


@pytest.mark.slow
def test_a_zuko_flow_trained_with_forward_kl_recovers_a_correlated_posterior():
    pyro.set_rng_seed(0)
    lg = LinearGaussianModel.random(2, 3, sigma=0.5, dtype=torch.float32)

    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ lg.A.T + lg.b, lg.sigma).to_event(1), obs=x)

    guide = AutoAmortizedFlow(model, flow=_zuko_builder())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), ForwardKL(num_particles=256))
    x = lg.sample_data(3, 1)[0]
    for _ in range(800):
        svi.step(x)
    mean, cov = lg.posterior_moments(x.unsqueeze(0))
    z = guide.sample_posterior(x, num_samples=20000)["z"]
    sd = cov.diagonal().sqrt()
    # The built-in flows' bounds (test_forward_kl_flow_recovers_correlated_posterior): the
    # amortization error after training, far above the Monte-Carlo error of 20000 draws.
    assert (((z.mean(0) - mean[0]) / sd).abs() < 0.25).all()
    assert torch.allclose(z.std(0), sd, rtol=0.15)
    corr = torch.corrcoef(z.T)[0, 1]
    assert abs(corr - cov[0, 1] / sd.prod()) < 0.1


def test_flow_builder_errors():
    with pytest.raises(TypeError, match="flow must be a builder"):
        AutoAmortizedFlow(bounded_model, flow="nsf")
    with pytest.raises(ValueError, match="with flow= use 'soft' or 'sigmoid'"):
        AutoAmortizedFlow(bounded_model, flow=_zuko_builder(), interval_transform="box")
    with pytest.raises(TypeError, match="must return an nn.Module"):
        AutoAmortizedFlow(bounded_model, flow=lambda f, c: "not a module")(torch.randn(4, 5))


def _summed_model(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(2, device=x.device), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("kind", ["normal", "nsf", "spline_ar", "maf", "realnvp", "zuko"])
def test_reset_parameters_draws_fresh_weights_in_place(kind, device):
    """reset_parameters re-initializes every network in place (the param store keeps the
    same tensors) and keeps the standardization: the flows whose layers start as the
    identity (zero output layers) give back exactly their density at set-up."""
    build = (
        (lambda m: AutoAmortizedFlow(m, flow=_zuko_builder())) if kind == "zuko" else GUIDES[kind]
    )
    guide = build(_summed_model).to(device)
    x = torch.tensor([0.7], device=device)
    with pytest.raises(RuntimeError, match="reset_parameters needs the guide set up"):
        guide.reset_parameters()
    guide(x)
    guide.standardize(
        observations={"x": 3.0 * torch.randn(200, 1, device=device) + 1.0},
        latents={"z": 2.0 * torch.randn(200, 2, device=device) - 0.5},
    )
    z = {"z": torch.randn(5, 2, device=device)}
    at_set_up = guide.log_prob(z, x)
    with torch.no_grad():  # stands in for training: every weight moves
        for p in guide.parameters():
            p.add_(torch.randn_like(p))
    trained = {name: p.clone() for name, p in guide.named_parameters()}
    assert not torch.allclose(guide.log_prob(z, x), at_set_up)
    stored = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    standardization = {k: v.clone() for k, v in guide.named_buffers() if "standardize" in k}
    guide.reset_parameters()
    for name, p in guide.named_parameters():
        assert id(p) in stored and p.device.type == device.type
        assert not torch.equal(p, trained[name]), name
    for k, v in standardization.items():
        assert torch.equal(guide.get_buffer(k), v)
    if kind in ("nsf", "spline_ar"):
        assert torch.allclose(guide.log_prob(z, x), at_set_up, atol=1e-5)
    if kind == "normal":  # the same posterior for every x, at the initial scale
        assert not guide.head.weight.any()
        scale = torch.full((2,), math.log(math.expm1(1.0)), device=device)
        assert torch.allclose(guide.head.bias[2:], scale)


def test_reset_parameters_names_a_network_it_cannot_reset_and_changes_nothing():
    class Scaled(torch.nn.Module):  # a raw parameter and no reset_parameters
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(1))
            self.linear = torch.nn.Linear(1, 7)

        def forward(self, x):
            return self.linear(x * self.gain)

    guide = AutoAmortizedFlow(_summed_model, embedding=Scaled(), num_transforms=1)
    guide(torch.zeros(1))
    before = {name: p.clone() for name, p in guide.named_parameters()}
    with pytest.raises(TypeError, match=r"network 'embedding' \(Scaled\) holds parameters"):
        guide.reset_parameters()
    for name, p in guide.named_parameters():
        assert torch.equal(p, before[name]), name


def test_reset_parameters_gives_a_box_flow_back_its_density_at_set_up():
    """The box layer (an autoregressive spline of the box, after the clamp) resets to the
    identity too: over bounded latents the reset guide's density is the set-up one."""
    guide = GUIDES["box"](bounded_model)
    x = torch.randn(4, 5)
    guide(x)
    n = 300
    guide.standardize(
        observations={"x": torch.randn(n, 4, 5)},
        latents={
            "rate": torch.rand(n),
            "scale": torch.randn(n).exp(),
            "probs": dist.Dirichlet(torch.ones(3)).sample((n,)),
        },
    )
    z = guide.sample_posterior(x, num_samples=7)
    at_set_up = guide.log_prob(z, x)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(torch.randn_like(p))
    assert not torch.allclose(guide.log_prob(z, x), at_set_up)
    guide.reset_parameters()
    assert torch.allclose(guide.log_prob(z, x), at_set_up, atol=1e-4)
