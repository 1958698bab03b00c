"""Monte-Carlo means of the losses, their gradients and diagnostics against the closed forms
of docs/theory.rst on the linear-Gaussian model, within 4 standard errors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import mean_and_se

from pyro_jc import JointContrastiveELBO, JointContrastiveIWELBO, JointContrastiveMeanFieldELBO
from pyro_jc.testing import LinearGaussianModel

N, D, M = 6, 2, 3


def fixed_guide(device, dtype):
    """A Gaussian guide ``q(z | x_n) = N(m_n, L L^T)`` with leaf tensors as parameters."""
    g = torch.Generator().manual_seed(1)
    m = (0.5 * torch.randn(N, D, generator=g)).to(device, dtype).requires_grad_()
    L = torch.tensor([[0.6, 0.0], [0.2, 0.4]]).to(device, dtype).requires_grad_()

    def guide(x, subsample_size=None):
        with pyro.plate("data", N, subsample_size=subsample_size) as idx:
            pyro.sample("z", dist.MultivariateNormal(m[idx], scale_tril=L.tril()))

    return guide, m, L


def mc_loss_and_grads(elbo, model, guide, x, params, repeats=40):
    losses, grads = [], []
    for _ in range(repeats):
        loss = elbo.differentiable_loss(model, guide, x)
        losses.append(loss.detach())
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return mean_and_se(losses), mean_and_se(grads)


ELBOS = {
    "elbo": lambda: JointContrastiveELBO(num_particles=64, vectorize_particles=True),
    "mean_field": lambda: JointContrastiveMeanFieldELBO(num_particles=64, vectorize_particles=True),
    "iw_k1": lambda: JointContrastiveIWELBO(num_particles=1),
}


@pytest.mark.parametrize("name", ELBOS)
def test_loss_and_gradient_match_closed_form(name, device, dtype):
    lg = LinearGaussianModel.random(D, M, device=device, dtype=dtype)
    x = lg.sample_data(0, N)
    guide, m, L = fixed_guide(device, dtype)
    repeats = 40 if name != "iw_k1" else 400
    (loss, loss_se), (grad, grad_se) = mc_loss_and_grads(
        ELBOS[name](), lg.model, guide, x, [m, L], repeats
    )

    m64, L64 = m.detach().double().requires_grad_(), L.detach().double().requires_grad_()
    lg64 = LinearGaussianModel(lg.A.double(), lg.b.double(), lg.sigma, N)
    exact_loss = -lg64.elbo(x.double(), m64, L64.tril() @ L64.tril().T).sum()
    exact_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact_loss, [m64, L64])])
    tol = 4 * loss_se + (1e-3 if dtype == torch.float32 else 1e-9) * abs(exact_loss.item())
    assert abs(loss.item() - exact_loss.item()) < tol
    atol = 4 * grad_se.cpu() + (2e-3 if dtype == torch.float32 else 1e-9)
    assert ((grad.cpu() - exact_grad.cpu()).abs() <= atol).all(), (grad, exact_grad, grad_se)


def test_mean_field_has_lower_variance(device):
    lg = LinearGaussianModel.random(D, M, device=device)
    x = lg.sample_data(0, N)
    guide, m, L = fixed_guide(device, torch.float64)
    _, (_, se_mc) = mc_loss_and_grads(ELBOS["elbo"](), lg.model, guide, x, [m, L], 20)
    _, (_, se_mf) = mc_loss_and_grads(ELBOS["mean_field"](), lg.model, guide, x, [m, L], 20)
    assert se_mf.sum() < se_mc.sum()


def test_iw_bound_increases_with_k_toward_log_evidence(device):
    lg = LinearGaussianModel.random(D, M, device=device)
    x = lg.sample_data(0, N)
    guide, m, L = fixed_guide(device, torch.float64)
    log_px = lg.log_evidence(x).sum().item()
    exact_elbo = lg.elbo(x, m.detach(), (L @ L.T).detach()).sum().item()
    bounds = []
    for k in (1, 4, 16, 256):
        elbo = JointContrastiveIWELBO(num_particles=k)
        values = [-torch.tensor(elbo.loss(lg.model, guide, x)) for _ in range(200)]
        bounds.append(mean_and_se(values))
    (b1, se1) = bounds[0]
    assert abs(b1 - exact_elbo) < 4 * se1
    for (lo, lo_se), (hi, hi_se) in zip(bounds, bounds[1:], strict=False):
        assert hi - lo > 4 * math.hypot(lo_se, hi_se)
    top, top_se = bounds[-1]
    assert top < log_px + 4 * top_se
    assert log_px - top < 0.1 * (log_px - exact_elbo)


def test_log_evidence_is_per_datapoint(device):
    lg = LinearGaussianModel.random(D, M, device=device)
    x = lg.sample_data(0, N)
    mean, cov = lg.posterior_moments(x)
    # An overdispersed posterior as proposal: bounded weights, small bias.
    scale_tril = torch.linalg.cholesky(1.5 * cov)

    def guide(x):
        with pyro.plate("data", N):
            pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=scale_tril))

    elbo = JointContrastiveIWELBO(num_particles=1024)
    estimates = [elbo.log_evidence(lg.model, guide, x) for _ in range(16)]
    assert estimates[0].shape == (N,)
    estimate, se = mean_and_se(estimates)
    # The bias is about var(w) / (2K) < 1e-3 nats here.
    assert ((estimate - lg.log_evidence(x)).abs() < 4 * se + 1e-3).all()


@pytest.mark.parametrize("cls", [JointContrastiveELBO, JointContrastiveMeanFieldELBO])
def test_reconstruction_and_rate_match_closed_form(cls, device):
    lg = LinearGaussianModel.random(D, M, device=device)
    x = lg.sample_data(0, N)
    guide, m, L = fixed_guide(device, torch.float64)
    elbo = cls(num_particles=64, vectorize_particles=True, data_entropy=1.5)
    recon, rate, joint_kl = [], [], []
    for _ in range(40):
        elbo.loss(lg.model, guide, x)
        for values, key in [(recon, "reconstruction"), (rate, "rate"), (joint_kl, "joint_kl")]:
            values.append(torch.tensor(elbo.diagnostics[key], dtype=torch.float64))
    S = (L @ L.T).detach()
    exact_recon = lg.reconstruction(x, m.detach(), S).mean().item()
    exact_rate = lg.rate(m.detach(), S).mean().item()
    for (est, se), exact in [
        (mean_and_se(recon), exact_recon),
        (mean_and_se(rate), exact_rate),
        (mean_and_se(joint_kl), exact_recon + exact_rate - 1.5),
    ]:
        assert abs(est.item() - exact) < 4 * se.item() + 1e-6 * abs(exact)


@pytest.mark.slow
def test_information_terms_match_closed_form(device):
    """Amortized linear guide q(z|x) = N(Mx + c, S) on a large batch of evidence samples:
    I(x; z) and KL[q(z) || p(z)] have closed forms for x ~ N(b, C)."""
    lg = LinearGaussianModel.random(D, M, device=device)
    n = 4000
    x = lg.sample_data(3, n)
    gen = torch.Generator().manual_seed(2)
    Mx = (0.5 * torch.randn(D, M, generator=gen, dtype=torch.float64)).to(device)
    c = torch.tensor([0.3, -0.2], dtype=torch.float64, device=device)
    S = torch.tensor([[0.3, 0.05], [0.05, 0.2]], dtype=torch.float64, device=device)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(x @ Mx.T + c, covariance_matrix=S))

    elbo = JointContrastiveELBO(estimate_information=True)
    values = []
    for _ in range(5):
        elbo.loss(lg.model, guide, x)
        keys = ("mutual_information", "marginal_kl", "rate")
        values.append(torch.tensor([elbo.diagnostics[k] for k in keys], dtype=torch.float64))
    (mi, mkl, rate), se = mean_and_se(values)

    agg_cov = Mx @ lg.evidence_cov() @ Mx.T + S
    exact_mi = 0.5 * (torch.logdet(agg_cov) - torch.logdet(S)).item()
    agg_mean = Mx @ lg.b + c
    eye = torch.eye(D, dtype=torch.float64, device=device)
    exact_mkl = torch.distributions.kl_divergence(
        dist.MultivariateNormal(agg_mean, agg_cov), dist.MultivariateNormal(0 * agg_mean, eye)
    ).item()
    # The data are one finite sample of N(b, C): over 20 data sets of n = 4000 the estimates
    # scatter with sd 0.017 (MI) and 0.015 (marginal KL) nats around the exact values (mean
    # offsets 0.005 and 0.0003), so 4 sd = 0.07 nats.
    assert abs(mi.item() - exact_mi) < 0.07
    assert abs(mkl.item() - exact_mkl) < 0.07
    assert abs(rate.item() - (mi + mkl).item()) < 1e-6


@pytest.mark.slow
def test_iw_discrete_gradient_matches_enumeration():
    """Score-function (VIMCO) gradients of the IW bound for a binary latent: the exact bound
    and its gradient follow by enumerating all 2^K assignments of the K particles."""
    import itertools

    K = 3
    x = torch.tensor([-1.2, 0.3, 1.5], dtype=torch.float64)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)

    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.3, dtype=torch.float64)))
            pyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(logits=w * x + b))

    q = dist.Bernoulli(logits=w * x + b)
    exact = 0.0
    for cs in itertools.product([0.0, 1.0], repeat=K):
        c = torch.tensor(cs, dtype=torch.float64).unsqueeze(-1)  # [K, 1]
        log_w = (
            dist.Bernoulli(torch.tensor(0.3, dtype=torch.float64)).log_prob(c)
            + dist.Normal(2.0 * c - 1.0, 1.0).log_prob(x)
            - q.log_prob(c)
        )
        prob = q.log_prob(c).sum(0).exp()
        exact = exact + (prob * (torch.logsumexp(log_w, 0) - math.log(K))).sum()
    exact_grad = torch.stack(torch.autograd.grad(-exact, [w, b]))

    elbo = JointContrastiveIWELBO(num_particles=K)
    values, grads = [], []
    for _ in range(3000):
        loss = elbo.differentiable_loss(model, guide, x)
        values.append(loss.detach())
        grads.append(torch.stack(torch.autograd.grad(loss, [w, b])))
    (value, value_se), (grad, grad_se) = mean_and_se(values), mean_and_se(grads)
    assert abs(value + exact.item()) < 4 * value_se
    assert ((grad - exact_grad).abs() < 4 * grad_se).all(), (grad, exact_grad, grad_se)
