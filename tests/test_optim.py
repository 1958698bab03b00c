"""pyro_jc.optim: one torch optimizer for all parameters, a drop-in for SVI's optim."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_jc import optim


def model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def guide(x):
    m = pyro.param("m", torch.tensor(0.3))
    s = pyro.param("s", torch.tensor(0.5), constraint=dist.constraints.positive)
    pyro.sample("loc", dist.Normal(m, s))


def run(optimizer, steps=25):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = SVI(model, guide, optimizer, Trace_ELBO())
    x = torch.randn(10)
    for _ in range(steps):
        svi.step(x)
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


@pytest.mark.parametrize("clip_args", [None, {"clip_norm": 0.5}, {"clip_value": 0.1}])
def test_same_trajectory_as_pyro_adam(clip_args):
    # Adam is elementwise: one optimizer over all parameters must step exactly like Pyro's
    # one optimizer per parameter (clipping per parameter too).
    pyro_adam = pyro.optim.Adam({"lr": 0.05}, clip_args=clip_args)
    ours = run(optim.Adam({"lr": 0.05}, clip_args))
    theirs = run(pyro_adam)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6), k
    assert not torch.allclose(ours["m"], torch.tensor(0.3))


def test_only_the_current_parameters_move():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = optim.Adam({"lr": 0.1})
    pyro.clear_param_store()
    for p in (a, b):
        p.grad = torch.ones(2)
    opt([a, b])
    before = b.detach().clone()
    a.grad, b.grad = torch.ones(2), torch.ones(2)  # b has a stale gradient, but is not stepped
    opt([a])
    assert torch.equal(b.detach(), before)
    assert (a.detach() < before).all()


def test_state_round_trip():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    opt = optim.Adam({"lr": 0.05})
    svi = SVI(model, guide, opt, Trace_ELBO())
    x = torch.randn(10)
    for _ in range(5):
        svi.step(x)
    state = opt.get_state()
    params = copy.deepcopy(pyro.get_param_store().get_state())

    def one_more_step(optimizer):
        pyro.set_rng_seed(1)
        SVI(model, guide, optimizer, Trace_ELBO()).step(x)
        return pyro.param("m").detach().clone()

    continued = one_more_step(opt)  # same parameter objects, same optimizer
    pyro.get_param_store().set_state(copy.deepcopy(params))
    restored = optim.Adam({"lr": 0.05})
    restored.set_state(state)
    assert torch.equal(one_more_step(restored), continued)
    pyro.get_param_store().set_state(copy.deepcopy(params))
    assert not torch.equal(one_more_step(optim.Adam({"lr": 0.05})), continued)  # fresh state


def test_bad_arguments():
    with pytest.raises(ValueError, match="one dict"):
        optim.Adam(lambda name, param: {"lr": 0.1})
    with pytest.raises(ValueError, match="clip_norm"):
        optim.Adam({"lr": 0.1}, {"max_norm": 1.0})
