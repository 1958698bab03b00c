"""Same traces (same seed) give the same value and gradients as Pyro's Trace_ELBO, and
loss / loss_and_grads / differentiable_loss agree."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from pyro_jc import JointContrastiveELBO, JointContrastiveMeanFieldELBO

N, T = 12, 3


def make_problem(device, dtype, discrete=True):
    """Global latent, local continuous and discrete latents, nested plates, subsampling,
    poutine.scale and poutine.mask, and a learnable model parameter."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, T, generator=g).to(device, dtype)
    mask = (torch.arange(T, device=device) < 2).expand(N, T)

    def model(x):
        loc = pyro.param("model_loc", torch.tensor(0.5, device=device, dtype=dtype))
        mu = pyro.sample("mu", dist.Normal(loc, 1.0))
        with pyro.plate("data", N, subsample_size=5, dim=-2) as idx:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            c = pyro.sample("c", dist.Bernoulli(torch.sigmoid(z))) if discrete else 0.0
            with pyro.plate("time", T, dim=-1), poutine.mask(mask=mask[idx]):
                with poutine.scale(scale=0.7):
                    pyro.sample("x", dist.Normal(z + c, 1.0), obs=x[idx])

    def guide(x):
        m = pyro.param("m", torch.zeros(N, 1, device=device, dtype=dtype))
        s = pyro.param("s", torch.ones(N, 1, device=device, dtype=dtype), constraints.positive)
        p = pyro.param(
            "p", 0.5 * torch.ones(N, 1, device=device, dtype=dtype), constraints.unit_interval
        )
        pyro.sample(
            "mu",
            dist.Normal(pyro.param("mu_loc", torch.zeros((), device=device, dtype=dtype)), 0.5),
        )
        with pyro.plate("data", N, subsample_size=5, dim=-2) as idx:
            pyro.sample("z", dist.Normal(m[idx], s[idx]))
            if discrete:
                pyro.sample("c", dist.Bernoulli(p[idx]))

    return model, guide, x


def grads_after(loss_fn, seed, model, guide, x):
    pyro.set_rng_seed(seed)
    with poutine.trace(param_only=True) as tr:
        value = loss_fn(model, guide, x)
    params = {name: site["value"].unconstrained() for name, site in tr.trace.nodes.items()}
    grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return value, grads


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize(
    "ours,theirs",
    [(JointContrastiveELBO, Trace_ELBO), (JointContrastiveMeanFieldELBO, TraceMeanField_ELBO)],
)
def test_same_value_and_gradient_as_pyro(ours, theirs, vectorize, device, dtype):
    # Pyro's TraceMeanField_ELBO rejects non-reparameterized sites; ours does not.
    discrete = theirs is Trace_ELBO
    model, guide, x = make_problem(device, dtype, discrete)
    kwargs = dict(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=2)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for seed in range(3):
        v1, g1 = grads_after(theirs(**kwargs).loss_and_grads, seed, model, guide, x)
        v2, g2 = grads_after(ours(**kwargs).loss_and_grads, seed, model, guide, x)
        assert v1 == pytest.approx(v2, rel=tol["rtol"], abs=tol["atol"])
        assert (
            g1.keys()
            == g2.keys()
            == {"m", "s", "mu_loc", "model_loc"} | ({"p"} if discrete else set())
        )
        for name in g1:
            torch.testing.assert_close(g1[name], g2[name], **tol)


@pytest.mark.parametrize("cls", [JointContrastiveELBO, JointContrastiveMeanFieldELBO])
def test_three_methods_agree(cls, device):
    model, guide, x = make_problem(device, torch.float64)
    elbo = cls(num_particles=2, vectorize_particles=True, max_plate_nesting=2, beta=0.5)
    pyro.set_rng_seed(7)
    value = elbo.loss(model, guide, x)
    v_grad, grads = grads_after(elbo.loss_and_grads, 7, model, guide, x)
    pyro.set_rng_seed(7)
    with poutine.trace(param_only=True) as tr:
        surrogate = elbo.differentiable_loss(model, guide, x)
    params = {name: s["value"].unconstrained() for name, s in tr.trace.nodes.items()}
    auto = torch.autograd.grad(surrogate, list(params.values()))
    assert value == pytest.approx(v_grad, rel=1e-12)
    assert surrogate.item() == pytest.approx(value, rel=1e-12)
    for name, g in zip(params, auto, strict=True):
        torch.testing.assert_close(g, grads[name])


def test_data_entropy_shifts_value_not_gradient():
    model, guide, x = make_problem("cpu", torch.float64)
    plain = JointContrastiveELBO(max_plate_nesting=2)
    shifted = JointContrastiveELBO(max_plate_nesting=2, data_entropy=2.0)
    v1, g1 = grads_after(plain.loss_and_grads, 3, model, guide, x)
    v2, g2 = grads_after(shifted.loss_and_grads, 3, model, guide, x)
    assert v1 - v2 == pytest.approx(N * 2.0)
    assert shifted.diagnostics["joint_kl"] == pytest.approx(-shifted.diagnostics["elbo"] - 2.0)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name])


def test_beta_weights_the_rate():
    model, guide, x = make_problem("cpu", torch.float64)
    for beta in (0.0, 0.3, 2.0):
        elbo = JointContrastiveELBO(max_plate_nesting=2, beta=beta)
        pyro.set_rng_seed(5)
        loss = elbo.loss(model, guide, x)
        d = elbo.diagnostics
        assert loss == pytest.approx(N * (d["reconstruction"] + beta * d["rate"]))


def test_beta_zero_gives_guide_no_rate_gradient():
    """With beta = 0 the guide's reparameterized site gets only reconstruction gradients: a
    guide for a site that does not affect x gets no gradient at all."""

    def model(x):
        pyro.sample("u", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def guide(x):
        pyro.sample("u", dist.Normal(pyro.param("u_loc", torch.tensor(1.0)), 1.0))

    _, grads = grads_after(
        JointContrastiveELBO(beta=0.0).loss_and_grads, 0, model, guide, torch.tensor(0.3)
    )
    assert grads["u_loc"].abs().item() == 0.0
    # Analytic rate: d/dm KL[N(m, 1) || N(0, 1)] = m, scaled by beta.
    loss = JointContrastiveMeanFieldELBO(beta=2.0).loss_and_grads
    _, grads = grads_after(loss, 0, model, guide, torch.tensor(0.3))
    assert grads["u_loc"].item() == pytest.approx(2.0)


class Model(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.tensor(0.0))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(self.loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


class Guide(PyroModule):
    def __init__(self):
        super().__init__()
        self.w = PyroParam(torch.tensor(0.0))
        self.s = PyroParam(torch.tensor(1.0), constraint=constraints.positive)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.w * x, self.s))


def test_elbo_module_path_trains_with_plain_torch():
    """``elbo(model, guide)`` is an nn.Module: a torch optimizer learns the exact posterior
    ``z | x ~ N(x / 2, 1 / 2)`` and the model's MLE ``loc = 0`` for data centred at 0."""
    pyro.settings.set(module_local_params=True)
    try:
        model, guide = Model(), Guide()
        x = torch.linspace(-2, 2, 64)
        x = x - x.mean()
        loss_fn = JointContrastiveELBO(num_particles=16, vectorize_particles=True)(model, guide)
        loss_fn(x)
        optim = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
        for _ in range(600):
            optim.zero_grad()
            loss_fn(x).backward()
            optim.step()
        assert guide.w.item() == pytest.approx(0.5, abs=0.05)
        assert guide.s.item() == pytest.approx(0.5**0.5, abs=0.05)
        assert model.loc.item() == pytest.approx(0.0, abs=0.1)
    finally:
        pyro.settings.set(module_local_params=False)


def test_svi_swap(device):
    """The drop-in: SVI(model, guide, optim, loss=JointContrastiveELBO()) steps and reports."""
    model, guide, x = make_problem(device, torch.float32)
    elbo = JointContrastiveELBO(max_plate_nesting=2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    losses = [svi.step(x) for _ in range(3)]
    assert all(isinstance(v, float) for v in losses)
    assert elbo.diagnostics["loss"] == losses[-1]
    assert set(elbo.diagnostics) >= {"elbo", "reconstruction", "rate"}
