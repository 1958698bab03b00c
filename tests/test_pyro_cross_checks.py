"""Same-seed cross-checks against Pyro's own estimators of the same objectives: identical
values and gradients on identical draws."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import CSIS, RenyiELBO

from pyro_jc import ForwardKL, JointContrastiveIWELBO
from pyro_jc.testing import BetaBernoulliModel


@pytest.mark.parametrize("vectorize", [True, False])
def test_iwelbo_is_renyi_elbo_at_alpha_zero(vectorize):
    """With a global latent the importance-weighted bound is one log-mean-exp over the
    particles, RenyiELBO(alpha=0)'s: same value and gradients under the same seed."""
    problem = BetaBernoulliModel(2.0, 3.0, num_data=20, seed=0)

    def guide(x):
        a = pyro.param("a", torch.tensor(3.0), constraint=dist.constraints.positive)
        b = pyro.param("b", torch.tensor(2.0), constraint=dist.constraints.positive)
        pyro.sample("p", dist.Beta(a, b))

    results = []
    for make in (JointContrastiveIWELBO, lambda **kw: RenyiELBO(alpha=0, **kw)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        elbo = make(num_particles=7, vectorize_particles=vectorize, max_plate_nesting=1)
        value = elbo.loss_and_grads(problem.model, guide, problem.data)
        grads = [pyro.param(n).unconstrained().grad.clone() for n in ("a", "b")]
        results.append((value, grads))
    (ours, our_grads), (pyros, pyro_grads) = results
    assert ours == pytest.approx(pyros, rel=1e-6)
    for g, h in zip(our_grads, pyro_grads, strict=True):
        assert torch.allclose(g, h, rtol=1e-5)


def test_forward_kl_is_csis_on_the_same_pairs():
    """ForwardKL drawing one pair at a time consumes the random stream as CSIS does (model
    run unconditioned, guide replayed): the same pairs, the same loss and gradients."""
    A = torch.tensor([[1.0, 0.5], [-0.3, 1.0], [0.8, -0.6]])
    net = torch.nn.Linear(3, 2)

    def model(observations):  # CSIS's convention: the data in a dict
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ A.T, 0.5).to_event(1), obs=observations["x"])

    def guide(observations):
        pyro.module("net", net)
        pyro.sample("z", dist.Normal(net(observations["x"]), 0.7).to_event(1))

    obs = {"x": torch.tensor([0.3, -0.2, 1.0])}
    loss = ForwardKL(
        num_particles=20,
        vectorize_particles=False,
        clip_norm=None,
        observations=lambda values, *args, **kwargs: ((), {"observations": values}),
    )
    loss.loss(model, guide, observations=obs)  # set-up: one model run with the data
    pyro.set_rng_seed(0)
    ours = loss.loss_and_grads(model, guide, observations=obs)
    our_grad, net.weight.grad = net.weight.grad.clone(), None
    pyro.set_rng_seed(0)
    csis = CSIS(model, guide, pyro.optim.Adam({"lr": 1e-3}), training_batch_size=20)
    theirs = csis.loss_and_grads(True, None, observations=obs)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert torch.allclose(our_grad, net.weight.grad, rtol=1e-5)
