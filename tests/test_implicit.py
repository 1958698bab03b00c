"""Implicit: a sample-only distribution around torch, numpy, vectorized or one-draw simulators."""

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_jc import ForwardKL, Implicit, ImplicitDensityError, SimulatorError, simulate
from pyro_jc.joints import model_joint_trace


def shift(theta):
    # Vectorized: theta (n, 2) -> (n, 3), deterministic so shapes and values can be checked.
    return torch.cat([theta, theta.sum(-1, keepdim=True)], -1)


def test_vectorized_simulator_under_plates_and_particles(device):
    calls = []

    def simulator(theta):
        calls.append(theta.shape)
        return shift(theta)

    def model():
        with pyro.plate("groups", 4, dim=-2), pyro.plate("data", 5, dim=-1):
            theta = pyro.sample(
                "theta", dist.Normal(torch.zeros(2, device=device), 1.0).to_event(1)
            )
            return pyro.sample(
                "x", Implicit(simulator, theta, event_shape=(3,), param_event_dims=1)
            )

    trace = model_joint_trace(model, (), {}, num_samples=7, max_plate_nesting=2)
    theta, x = trace.nodes["theta"]["value"], trace.nodes["x"]["value"]
    assert x.shape == (7, 4, 5, 3) and x.device.type == device.type
    assert calls == [torch.Size([7 * 4 * 5, 2])]  # one batched call
    assert torch.equal(x, shift(theta))


def test_numpy_one_draw_simulator_returns_tensors_on_the_parameters_device(device, dtype):
    seen = []

    def simulator(rate, scale):
        assert isinstance(rate, np.floating) and rate.shape == ()  # a numpy scalar
        seen.append(float(rate))
        return np.array([rate * scale, rate + scale])

    rate = torch.tensor([1.0, 2.0, 3.0], device=device, dtype=dtype)
    d = Implicit(simulator, rate, 10.0, event_shape=(2,), vectorized=False, numpy=True)
    x = d.sample((2,))
    assert x.shape == (2, 3, 2) and x.dtype == dtype and x.device.type == device.type
    assert seen == [1.0, 2.0, 3.0] * 2
    assert torch.allclose(x[1, 2], torch.tensor([30.0, 13.0], device=device, dtype=dtype))


def test_reparameterized_simulator_carries_gradients():
    loc = torch.tensor([0.5, -1.0], requires_grad=True)
    d = Implicit(lambda m: m + torch.randn_like(m), loc, reparameterized=True)
    assert d.has_rsample
    d.rsample((100,)).sum().backward()
    assert torch.allclose(loc.grad, torch.full((2,), 100.0))
    assert not Implicit(lambda m: m, loc).sample().requires_grad


def test_black_box_simulator_refuses_rsample():
    with pytest.raises(NotImplementedError, match="reparameterized=True"):
        Implicit(lambda m: m, torch.zeros(2)).rsample()


def test_log_prob_names_the_likelihood_free_losses():
    with pytest.raises(ImplicitDensityError, match="ForwardKL.*AdversarialELBO"):
        Implicit(lambda m: m, torch.zeros(2)).log_prob(torch.zeros(2))


def test_joint_contrastive_elbo_names_the_implicit_site():
    from pyro_jc import JointContrastiveELBO

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("sim", Implicit(lambda m: m, z), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ImplicitDensityError, match="'sim'.*implicit"):
        JointContrastiveELBO().loss(model, guide, torch.tensor(0.0))


def implicit_model(simulator, **kw):
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("obs", Implicit(simulator, z, **kw), obs=x)

    return model


@pytest.mark.parametrize(
    "simulator, match",
    [
        (lambda z: z[:, None].expand(-1, 2), r"'obs'.*shape \(\d+, 2\), expected \(\d+,\)"),
        (lambda z: z * float("nan"), r"'obs'.*non-finite.*on_invalid='drop'"),
        (lambda z: "text", r"'obs'.*cannot be converted"),
    ],
    ids=["shape", "nan", "type"],
)
def test_bad_simulator_output_names_the_site(simulator, match):
    model = implicit_model(simulator)
    with pytest.raises(SimulatorError, match=match):
        simulate(model, torch.zeros(3), num_simulations=4)


def test_invalid_simulations_are_dropped_counted_and_reported():
    def flaky(z):
        return torch.where(z > 1.0, torch.full_like(z, float("inf")), z + 0.1 * torch.randn_like(z))

    model = implicit_model(flaky, on_invalid="drop")
    x = torch.zeros(3)
    with pytest.warns(UserWarning, match="simulate dropped"):
        bank = simulate(model, x, num_simulations=500)
    assert bank["observations"]["obs"].shape == (500, 3)
    assert torch.isfinite(bank["observations"]["obs"]).all()
    assert (bank["latents"]["z"] <= 1.0).all()
    # P(z > 1) = 0.159: about 94 invalid draws per 500 valid ones.
    assert 40 < bank["num_invalid"] < 160

    def guide(x):
        pyro.sample("z", dist.Normal(x.mean(-1, keepdim=True), 1.0))

    loss = ForwardKL(num_particles=400)
    with pytest.warns(UserWarning, match="dropped .* simulations"):
        value = loss.loss(model, guide, x)
    assert np.isfinite(value)
    assert loss.diagnostics["num_invalid"] + loss.diagnostics["num_simulations"] == 400
    assert 20 < loss.diagnostics["num_invalid"] < 110 and loss.num_invalid > 0


@settings(max_examples=25, deadline=None)
@given(
    sample_shape=st.lists(st.integers(1, 3), max_size=2),
    batch_shape=st.lists(st.integers(1, 3), max_size=2),
    event=st.lists(st.integers(1, 3), max_size=2),
    vectorized=st.booleans(),
)
def test_shapes_property(sample_shape, batch_shape, event, vectorized):
    """Any sample/batch/event layout: the simulator sees flattened draws and the sample has
    shape sample + batch + event, with each draw computed from its own parameters."""
    event = tuple(event)
    loc = torch.randn(*batch_shape, 1)

    def simulator(m):
        if vectorized:
            return (2 * m).reshape((-1,) + (1,) * len(event)).expand((m.shape[0],) + event)
        return (2 * m).reshape((1,) * len(event)).expand(event)

    d = Implicit(simulator, loc, event_shape=event, param_event_dims=1, vectorized=vectorized)
    assert d.batch_shape == tuple(batch_shape)
    x = d.sample(tuple(sample_shape))
    assert x.shape == tuple(sample_shape) + tuple(batch_shape) + event
    expected = (2 * loc).reshape(tuple(batch_shape) + (1,) * len(event)).expand(x.shape)
    assert torch.equal(x, expected)
    # expand (as plates do) keeps the layout.
    wide = d.expand((4,) + tuple(batch_shape))
    assert wide.sample().shape == (4,) + tuple(batch_shape) + event


def test_predictive_samples_an_implicit_model():
    model = implicit_model(lambda z: z + torch.randn_like(z))
    samples = pyro.infer.Predictive(model, num_samples=6, parallel=True)(torch.zeros(3))
    assert samples["obs"].shape == (6, 3)
    trace = poutine.trace(model).get_trace(torch.zeros(3))
    assert torch.equal(trace.nodes["obs"]["value"], torch.zeros(3))


def test_a_simulator_written_with_pyro_statements_stays_a_black_box():
    # sbibm's simulators call pyro.sample internally: those sites must not enter the model.
    def simulator(z):
        noise = pyro.sample("noise", dist.Normal(torch.zeros_like(z), 1.0).to_event(1))
        return z + noise

    model = implicit_model(simulator)
    trace = poutine.trace(poutine.uncondition(model)).get_trace(torch.zeros(3))
    assert "noise" not in trace.nodes and trace.nodes["obs"]["value"].shape == (3,)
