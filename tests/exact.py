"""Closed forms for the linear-Gaussian model (docs/theory.rst):
``z ~ N(0, I_d)``, ``x | z ~ N(A z + b, sigma^2 I_m)``."""

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch


@dataclass
class LinearGaussian:
    A: torch.Tensor  # [m, d]
    b: torch.Tensor  # [m]
    sigma: float

    @classmethod
    def random(cls, d, m, sigma=0.5, seed=0, device="cpu", dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        b = torch.randn(m, generator=g, dtype=torch.float64)
        return cls(A.to(device, dtype), b.to(device, dtype), sigma)

    @property
    def d(self):
        return self.A.shape[1]

    def prior(self, like):
        eye = torch.eye(self.d, dtype=like.dtype, device=like.device)
        return dist.MultivariateNormal(like.new_zeros(self.d), scale_tril=eye)

    def model(self, x, subsample_size=None):
        """Pyro model over a data set ``x [N, m]`` with a data plate."""
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", dist.Normal(z @ self.A.T + self.b, self.sigma).to_event(1), obs=x[idx])

    def sample(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.d, generator=g, dtype=torch.float64)
        eps = torch.randn(n, self.A.shape[0], generator=g, dtype=torch.float64)
        z, eps = z.to(self.A), eps.to(self.A)
        return z @ self.A.T + self.b + self.sigma * eps

    # -- exact answers -----------------------------------------------------------------------
    def posterior(self, x):
        """Posterior mean ``[N, d]`` and covariance ``[d, d]``."""
        eye = torch.eye(self.d, dtype=self.A.dtype, device=self.A.device)
        cov = torch.linalg.inv(eye + self.A.T @ self.A / self.sigma**2)
        mean = (x - self.b) @ self.A @ cov.T / self.sigma**2
        return mean, cov

    def evidence_cov(self):
        m = self.A.shape[0]
        eye = torch.eye(m, dtype=self.A.dtype, device=self.A.device)
        return self.A @ self.A.T + self.sigma**2 * eye

    def log_evidence(self, x):
        return dist.MultivariateNormal(self.b, self.evidence_cov()).log_prob(x)

    def elbo(self, x, m, S):
        """Exact ``ELBO(x_n) = log p(x_n) - KL[N(m_n, S) || p(z | x_n)]`` per datapoint."""
        mean, cov = self.posterior(x)
        return self.log_evidence(x) - gaussian_kl(m, S, mean, cov)

    def reconstruction(self, x, m, S):
        """``E_q[-log p(x|z)]`` per datapoint for ``q = N(m, S)``."""
        k = self.A.shape[0]
        resid = x - m @ self.A.T - self.b
        trace = torch.trace(self.A @ S @ self.A.T)
        return 0.5 * k * math.log(2 * math.pi * self.sigma**2) + ((resid**2).sum(-1) + trace) / (
            2 * self.sigma**2
        )

    def rate(self, m, S):
        """``KL[N(m, S) || N(0, I)]`` per datapoint."""
        eye = torch.eye(self.d, dtype=m.dtype, device=m.device)
        return gaussian_kl(m, S, torch.zeros_like(m), eye)


def gaussian_kl(m1, S1, m2, S2):
    """``KL[N(m1, S1) || N(m2, S2)]`` with batched means and shared covariances."""
    d = m1.shape[-1]
    S2_inv = torch.linalg.inv(S2)
    diff = m2 - m1
    return 0.5 * (
        torch.trace(S2_inv @ S1)
        + ((diff @ S2_inv) * diff).sum(-1)
        - d
        + torch.logdet(S2)
        - torch.logdet(S1)
    )


def mean_and_se(samples):
    samples = torch.stack(samples).double()
    return samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
