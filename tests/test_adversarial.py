"""AdversarialGuide: discriminator-estimated ratio on a linear-Gaussian with an implicit
likelihood, against the exact posterior and the exact joint KL (THEORY.md section 3)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI

from pyro_jc import AdversarialGuide, Implicit, JointContrastiveELBO, MissingGuideSiteError

D, M, SIGMA, N = 2, 3, 0.5, 256


class LinearGaussian:
    """``z_i ~ N(0, I_2)``, ``x_i = A z_i + 0.5 eps`` through a sample-only simulator."""

    def __init__(self, device=None, A=((1.0, 0.5), (-0.3, 1.0), (0.8, -0.6))):
        self.A = torch.tensor(A, device=device)
        self.precision = torch.eye(D, device=device) + self.A.T @ self.A / SIGMA**2
        self.cov = torch.linalg.inv(self.precision)
        self.gain = self.cov @ self.A.T / SIGMA**2  # posterior mean = gain @ x
        self.x_cov = self.A @ self.A.T + SIGMA**2 * torch.eye(M, device=device)

    def simulator(self, z):
        return z @ self.A.T + SIGMA * torch.randn(z.shape[:-1] + (M,), device=z.device)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample(
                "x", Implicit(self.simulator, z, event_shape=(M,), param_event_dims=1), obs=x
            )

    def data(self, n=N):
        """Fresh data from the model's marginal, so that ``k = p(x)`` and the KL is exact."""
        z = torch.randn(n, D, device=self.A.device)
        return self.simulator(z)

    def joint_kl(self, weight, bias, scale_tril):
        """Exact ``E_x KL(N(W x + b, L L^T) || p(z | x))`` under ``x ~ p(x)``."""
        cov = scale_tril @ scale_tril.T
        dw = weight - self.gain
        p = self.precision
        return 0.5 * (
            torch.trace(p @ cov)
            - D
            - torch.logdet(cov)
            - torch.logdet(p)
            + torch.trace(dw.T @ p @ dw @ self.x_cov)
            + bias @ p @ bias
        )


class GaussianGuide(torch.nn.Module):
    """``q(z_i | x_i) = N(W x_i + b, L L^T)``, full or mean-field."""

    def __init__(self, mean_field=False):
        super().__init__()
        self.linear = torch.nn.Linear(M, D)
        self.raw_tril = torch.nn.Parameter(0.5 * torch.eye(D))
        self.mean_field = mean_field

    @property
    def scale_tril(self):
        t = self.raw_tril
        return t.diagonal().diag_embed() if self.mean_field else t.tril()

    def forward(self, x):
        pyro.module("gaussian_guide", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(self.linear(x), scale_tril=self.scale_tril))


class NoiseFedGuide(GaussianGuide):
    """The same family with no density: ``z = W x + b + L eps`` from a sample-only network."""

    def forward(self, x):
        pyro.module("noise_fed_guide", self)

        def push(loc, tril):
            return loc + (tril @ torch.randn_like(loc).unsqueeze(-1)).squeeze(-1)

        loc = self.linear(x)
        tril = self.scale_tril.expand(loc.shape[:-1] + (D, D))
        with pyro.plate("data", x.shape[0]):
            z = Implicit(
                push, loc, tril, event_shape=(D,), param_event_dims=(1, 2), reparameterized=True
            )
            pyro.sample("z", z)


def train(lg, guide, steps, **kwargs):
    adversarial = AdversarialGuide(guide, **kwargs)
    svi = SVI(lg.model, adversarial, pyro.optim.Adam({"lr": 3e-3}), JointContrastiveELBO())
    for _ in range(steps):
        svi.step(lg.data())
    return adversarial


def guide_kl(lg, guide):
    with torch.no_grad():
        return lg.joint_kl(guide.linear.weight, guide.linear.bias, guide.scale_tril).item()


@pytest.mark.slow
@pytest.mark.parametrize(
    "guide_class", [GaussianGuide, NoiseFedGuide], ids=["explicit", "implicit"]
)
def test_full_covariance_guide_reaches_the_exact_posterior(guide_class):
    lg = LinearGaussian()
    guide = guide_class()
    train(lg, guide, 2000)
    assert guide_kl(lg, guide) < 0.01
    with torch.no_grad():
        cov = guide.scale_tril @ guide.scale_tril.T
        sd, exact_sd = cov.diagonal().sqrt(), lg.cov.diagonal().sqrt()
        assert ((sd - exact_sd).abs() / exact_sd < 0.05).all()
        x = lg.data(1000)
        mean_error = guide.linear(x) - x @ lg.gain.T
        assert (mean_error.pow(2).mean(0).sqrt() / exact_sd < 0.05).all()


@pytest.mark.slow
def test_mean_field_guide_lands_on_the_mean_field_optimum():
    # With "kl" the mean-field optimum has sd_i = Lambda_ii^(-1/2) (Lambda the posterior
    # precision): here 0.32 and 0.33, against marginal posterior sds of 0.68 and 0.72
    # (posterior correlation -0.89).
    lg = LinearGaussian(A=((1.0, 1.0), (1.0, 0.8), (0.5, 0.6)))
    guide = GaussianGuide(mean_field=True)
    train(lg, guide, 2000)
    with torch.no_grad():
        sd = guide.scale_tril.diagonal()
        optimum = lg.precision.diagonal().rsqrt()
        assert ((sd - optimum).abs() / optimum < 0.05).all()


def frozen_guide_estimate(lg, offset, residual, steps=400):
    """Train only the discriminator against a fixed guide whose means are off by ``offset``;
    return the estimated and the exact joint KL (per datapoint)."""
    guide = GaussianGuide()
    with torch.no_grad():
        guide.linear.weight.copy_(lg.gain)
        guide.linear.bias.copy_(offset)
        guide.raw_tril.copy_(torch.linalg.cholesky(lg.cov))
    adversarial = AdversarialGuide(guide, residual=residual, warmup_steps=0)
    estimates = []
    for step in range(steps):
        adversarial.loss(lg.model, lg.data())  # a discriminator step; the guide never moves
        if step >= steps - 100:
            estimates.append(adversarial.diagnostics["kl"])
    return sum(estimates) / len(estimates), guide_kl(lg, guide)


@pytest.mark.parametrize("target_kl", [0.5, 3.0])
def test_ratio_estimates_the_joint_kl_with_the_guide_frozen(target_kl, device):
    lg = LinearGaussian(device)
    direction = torch.tensor([1.0, -1.0], device=device)
    # 0.5 b^T P b = target
    offset = direction * (2 * target_kl / (direction @ lg.precision @ direction)).sqrt()
    estimate, exact = frozen_guide_estimate(lg, offset, residual=True)
    assert exact == pytest.approx(target_kl, rel=1e-4)
    assert estimate == pytest.approx(exact, rel=0.05)


def test_residual_ratio_fixes_the_underestimate_of_a_large_kl():
    lg = LinearGaussian()
    direction = torch.tensor([1.0, -1.0])
    offset = direction * (2 * 46.0 / (direction @ lg.precision @ direction)).sqrt()
    plain, exact = frozen_guide_estimate(lg, offset, residual=False)
    residual, _ = frozen_guide_estimate(lg, offset, residual=True)
    assert exact == pytest.approx(46.0, rel=1e-4)
    assert plain < 0.8 * exact  # a plain network saturates far below a large KL
    assert residual == pytest.approx(exact, rel=0.10)


def test_discriminator_is_hidden_from_svi_and_restored_with_state():
    lg = LinearGaussian()
    guide = GaussianGuide()
    adversarial = train(lg, guide, 3, warmup_steps=2)
    assert set(pyro.get_param_store().keys()) == {
        "gaussian_guide$$$linear.weight",
        "gaussian_guide$$$linear.bias",
        "gaussian_guide$$$raw_tril",
    }
    assert adversarial.num_guide_steps == 3
    diagnostics = set(adversarial.diagnostics)
    assert {"accuracy", "kl", "exp_t_model", "held_out_gap"} <= diagnostics

    x = lg.data()
    built = AdversarialGuide(GaussianGuide(), warmup_steps=0)
    built.loss(lg.model, x)  # builds its own discriminator
    built.load_state_dict(adversarial.state_dict())
    for name, value in adversarial.discriminator.state_dict().items():
        assert torch.equal(built.discriminator.state_dict()[name], value)
    assert built.num_guide_steps == 3

    fresh = AdversarialGuide(GaussianGuide(), warmup_steps=0)
    fresh.load_state_dict(adversarial.state_dict())  # applied when the first step builds it
    fresh.loss(lg.model, x)
    steps = [o.optimizer.state_dict()["state"][0]["step"].item() for o in (adversarial, fresh)]
    assert steps[1] == steps[0] + 1 and fresh.num_guide_steps == 4


def test_js_divergence_moves_the_guide_towards_the_posterior():
    lg = LinearGaussian()
    guide = GaussianGuide()
    before = guide_kl(lg, guide)
    train(lg, guide, 300, divergence="js")
    assert guide_kl(lg, guide) < 0.5 * before


def test_errors_name_the_site_and_the_fix():
    lg = LinearGaussian()
    x = lg.data(8)

    def no_plate(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ lg.A.T, SIGMA).to_event(1), obs=x[0])

    with pytest.raises(ValueError, match="data plate"):
        AdversarialGuide(GaussianGuide()).loss(no_plate, x)

    def global_latent(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.A.T + shift, SIGMA).to_event(1), obs=x)

    with pytest.raises(NotImplementedError, match="'shift' is outside the data plate"):
        AdversarialGuide(GaussianGuide()).loss(global_latent, x)

    def empty_guide(x):
        pass

    with pytest.raises(MissingGuideSiteError, match=r"\['z'\]"):
        AdversarialGuide(empty_guide).loss(lg.model, x)

    def not_reparameterized(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z", Implicit(lambda n: torch.randn(n.shape[0], D), x[:, 0], event_shape=(D,))
            )

    with pytest.raises(ValueError, match="'z' is not reparameterized"):
        AdversarialGuide(not_reparameterized).loss(lg.model, x)

    with pytest.raises(ValueError, match="divergence"):
        AdversarialGuide(GaussianGuide(), divergence="wasserstein")


@settings(max_examples=8, deadline=None)
@given(
    d=st.integers(1, 3),
    m=st.integers(1, 3),
    implicit_likelihood=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_residual_alone_gives_zero_kl_for_the_exact_posterior(d, m, implicit_likelihood, seed):
    """With the discriminator's network frozen at zero (learning rate 0), the logit is the
    residual alone: exact log densities where they exist, moment-matched Gaussians elsewhere.
    For the exact posterior guide of a linear-Gaussian the joint KL is zero, and so must the
    estimate be, whatever the dimensions and whichever terms are Gaussian-estimated."""
    torch.manual_seed(seed)
    a = torch.randn(m, d)
    precision = torch.eye(d) + a.T @ a / SIGMA**2
    cov = torch.linalg.inv(precision)
    gain = cov @ a.T / SIGMA**2

    def simulator(z):
        return z @ a.T + SIGMA * torch.randn(z.shape[:-1] + (m,))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            if implicit_likelihood:
                likelihood = Implicit(simulator, z, event_shape=(m,), param_event_dims=1)
            else:
                likelihood = dist.Normal(z @ a.T, SIGMA).to_event(1)
            pyro.sample("x", likelihood, obs=x)

    def exact_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(x @ gain.T, covariance_matrix=cov))

    adversarial = AdversarialGuide(exact_guide, learning_rate=0.0, warmup_steps=20)
    estimates = []
    for _ in range(30):
        x = simulator(torch.randn(512, d))
        estimates.append(adversarial.loss(model, x) / 512)
    assert adversarial.diagnostics["exp_t_model"] == pytest.approx(1.0, abs=0.3)
    assert abs(sum(estimates) / len(estimates)) < 0.1
