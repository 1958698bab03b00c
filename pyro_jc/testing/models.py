"""Models with exact posteriors: each holds a Pyro model, a data set simulated from it, and
the exact posterior of every latent site given any data set of that size."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import torch

from ..distributions import Implicit


class ExactModel:
    """A model whose posterior is known in closed form.

    :meth:`model` is the Pyro model, :meth:`posterior` the exact posterior
    ``{site: distribution}`` (batched over the data plate for local latents), and
    :meth:`guide` a Pyro guide that samples it, amortized over data sets.

    :ivar data: a data set drawn from the model (the model's argument).
    """

    latent_sites = ()

    def model(self, x):
        raise NotImplementedError

    def posterior(self, x):
        raise NotImplementedError

    def guide(self, x):
        """Samples the exact posterior (under any outer plates, e.g. of simulations)."""
        for name, posterior in self.posterior(x).items():
            with self._site_plates(name, x):
                pyro.sample(name, posterior)

    def _site_plates(self, name, x):
        return pyro.plate("data", x.shape[-1], dim=-1) if self.is_local(name) else nullcontext()

    def is_local(self, name):
        return False

    def sample_data(self, seed, num_data=None):
        """A data set from the prior predictive, seeded (the global RNG is left as it was).

        :param int seed: the seed.
        :param int num_data: its size (default: the model's ``num_data``).
        """
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self._simulate(self.num_data if num_data is None else num_data)

    def _simulate(self, num_data):
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v}" for k, v in self._describe().items())
        return f"{type(self).__name__}({fields})"

    def _describe(self):
        return {}


class LinearGaussianModel(ExactModel):
    """``z_i ~ N(0, I_d)``, ``x_i ~ N(A z_i + b, sigma^2 I_m)`` for ``n`` datapoints (local
    latents). Data have shape ``(..., n, m)``.

    Besides the exact posterior, it has the closed forms a loss can be checked against
    (``docs/theory.rst``): the evidence, the ELBO of a Gaussian guide and its two terms, and
    the joint KL of a linear amortized guide.

    :param A: the design matrix, ``(m, d)``.
    :param b: the offset, ``(m,)``.
    :param float sigma: the noise scale.
    :param int num_data: the data set's size.
    :param int seed: the seed of :attr:`data`.
    :param bool implicit: give the likelihood as a sample-only simulator
        (:class:`~pyro_jc.Implicit`), to test likelihood-free losses.
    """

    latent_sites = ("z",)

    def __init__(self, A, b, sigma, num_data, seed=0, implicit=False):
        self.A, self.b, self.sigma, self.num_data = A, b, float(sigma), num_data
        self.implicit = implicit
        self.data = self.sample_data(seed)

    @classmethod
    def random(
        cls,
        latent_dim,
        obs_dim,
        *,
        sigma=0.5,
        num_data=8,
        seed=0,
        device=None,
        dtype=torch.float64,
        implicit=False,
    ):
        """A model with a random design ``A ~ N(0, 1/d)`` and offset ``b ~ N(0, 1)``, drawn
        from ``seed`` (in float64 on the CPU, then moved: the same model on any device)."""
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(obs_dim, latent_dim, generator=g, dtype=torch.float64)
        b = torch.randn(obs_dim, generator=g, dtype=torch.float64)
        A, b = (A / math.sqrt(latent_dim)).to(device, dtype), b.to(device, dtype)
        return cls(A, b, sigma, num_data, seed=seed, implicit=implicit)

    @property
    def latent_dim(self):
        return self.A.shape[1]

    @property
    def obs_dim(self):
        return self.A.shape[0]

    def prior(self, like):
        """``N(0, I_d)`` on the device and dtype of ``like``."""
        eye = torch.eye(self.latent_dim, dtype=like.dtype, device=like.device)
        return dist.MultivariateNormal(like.new_zeros(self.latent_dim), scale_tril=eye)

    def simulator(self, z):
        """``A z + b + sigma eps`` (the likelihood as a simulator)."""
        noise = torch.randn(z.shape[:-1] + (self.obs_dim,), dtype=z.dtype, device=z.device)
        return z @ self.A.T + self.b + self.sigma * noise

    def model(self, x, subsample_size=None):
        """The Pyro model over a data set ``x`` of shape ``(..., n, m)``; ``subsample_size``
        subsamples the data plate."""
        with pyro.plate("data", x.shape[-2], subsample_size=subsample_size) as idx:
            z = pyro.sample("z", self.prior(x))
            obs = x.index_select(-2, idx) if subsample_size is not None else x
            if self.implicit:
                likelihood = Implicit(
                    self.simulator, z, event_shape=(self.obs_dim,), param_event_dims=1
                )
            else:
                likelihood = dist.Normal(z @ self.A.T + self.b, self.sigma).to_event(1)
            pyro.sample("x", likelihood, obs=obs)

    def posterior(self, x):
        mean, cov = self.posterior_moments(x)
        return {"z": dist.MultivariateNormal(mean, covariance_matrix=cov)}

    @property
    def precision(self):
        """The posterior precision ``I + A^T A / sigma^2`` (the same for every datapoint)."""
        eye = torch.eye(self.latent_dim, dtype=self.A.dtype, device=self.A.device)
        return eye + self.A.T @ self.A / self.sigma**2

    @property
    def posterior_cov(self):
        """The posterior covariance (the same for every datapoint)."""
        return torch.linalg.inv(self.precision)

    @property
    def gain(self):
        """The matrix ``G`` of the posterior mean ``G (x - b)``."""
        return self.posterior_cov @ self.A.T / self.sigma**2

    def posterior_moments(self, x):
        """Posterior mean ``(..., n, d)`` and covariance ``(d, d)`` (shared by datapoints)."""
        return (x - self.b) @ self.gain.T, self.posterior_cov

    def evidence_cov(self):
        """Covariance of one datapoint's marginal ``p(x_i) = N(b, A A^T + sigma^2 I)``."""
        eye = torch.eye(self.obs_dim, dtype=self.A.dtype, device=self.A.device)
        return self.A @ self.A.T + self.sigma**2 * eye

    def log_evidence(self, x):
        """``log p(x_i)`` per datapoint."""
        return dist.MultivariateNormal(self.b, self.evidence_cov()).log_prob(x)

    def elbo(self, x, m, S):
        """``ELBO(x_i) = log p(x_i) - KL[N(m_i, S) || p(z | x_i)]`` per datapoint for the
        guide ``q(z_i) = N(m_i, S)``."""
        mean, cov = self.posterior_moments(x)
        return self.log_evidence(x) - gaussian_kl(m, S, mean, cov)

    def reconstruction(self, x, m, S):
        """``E_q[-log p(x_i | z_i)]`` per datapoint for ``q = N(m_i, S)``."""
        resid = x - m @ self.A.T - self.b
        trace = torch.trace(self.A @ S @ self.A.T)
        return 0.5 * self.obs_dim * math.log(2 * math.pi * self.sigma**2) + (
            (resid**2).sum(-1) + trace
        ) / (2 * self.sigma**2)

    def rate(self, m, S):
        """``KL[N(m_i, S) || N(0, I)]`` per datapoint."""
        eye = torch.eye(self.latent_dim, dtype=m.dtype, device=m.device)
        return gaussian_kl(m, S, torch.zeros_like(m), eye)

    def expected_kl(self, weight, bias, scale_tril):
        """``E_{x ~ p(x)} KL[N(W x + c, L L^T) || p(z | x)]`` for the linear amortized guide
        ``q(z | x) = N(W x + c, L L^T)`` (the joint KL of forward and reverse training
        alike, up to the data entropy)."""
        precision = self.precision
        S = scale_tril @ scale_tril.T
        dw = weight - self.gain
        m = weight @ self.b + bias  # the guide's mean minus the posterior's, at x = b
        return 0.5 * (
            torch.trace(precision @ S)
            - self.latent_dim
            - torch.logdet(S)
            - torch.logdet(precision)
            + torch.trace(dw.T @ precision @ dw @ self.evidence_cov())
            + m @ precision @ m
        )

    def _site_plates(self, name, x):
        return pyro.plate("data", x.shape[-2], dim=-1)

    def is_local(self, name):
        return True

    def _simulate(self, num_data):
        # In float64 on the CPU, then moved: the same data set on any device and dtype.
        z = torch.randn(num_data, self.latent_dim, dtype=torch.float64)
        eps = torch.randn(num_data, self.obs_dim, dtype=torch.float64)
        A, b = self.A.detach().cpu().double(), self.b.detach().cpu().double()
        return (z @ A.T + b + self.sigma * eps).to(self.A)

    def _describe(self):
        return {
            "d": self.latent_dim,
            "m": self.obs_dim,
            "sigma": round(self.sigma, 3),
            "num_data": self.num_data,
        }


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


class BetaBernoulliModel(ExactModel):
    """``p ~ Beta(a, b)``, ``x_i ~ Bernoulli(p)`` i.i.d. (one global latent on ``(0, 1)``)."""

    latent_sites = ("p",)

    def __init__(self, a, b, num_data, seed=0):
        self.a, self.b, self.num_data = float(a), float(b), num_data
        self.data = self.sample_data(seed)

    def model(self, x):
        p = pyro.sample("p", dist.Beta(x.new_tensor(self.a), x.new_tensor(self.b)))
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("x", dist.Bernoulli(p), obs=x)

    def posterior(self, x):
        # Batched data sets keep a trailing 1 so the batch lines up with plates over them.
        heads = x.sum(-1, keepdim=x.dim() > 1)
        return {"p": dist.Beta(self.a + heads, self.b + x.shape[-1] - heads)}

    def _simulate(self, num_data):
        p = dist.Beta(self.a, self.b).sample()
        return dist.Bernoulli(p).sample((num_data,))

    def _describe(self):
        return {"a": round(self.a, 3), "b": round(self.b, 3), "num_data": self.num_data}


class GammaPoissonModel(ExactModel):
    """``rate ~ Gamma(shape, prior_rate)``, ``x_i ~ Poisson(rate)`` i.i.d. (one global latent
    on ``(0, inf)``)."""

    latent_sites = ("rate",)

    def __init__(self, shape, prior_rate, num_data, seed=0):
        self.shape, self.prior_rate, self.num_data = float(shape), float(prior_rate), num_data
        self.data = self.sample_data(seed)

    def model(self, x):
        rate = pyro.sample(
            "rate", dist.Gamma(x.new_tensor(self.shape), x.new_tensor(self.prior_rate))
        )
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("x", dist.Poisson(rate), obs=x)

    def posterior(self, x):
        total = x.sum(-1, keepdim=x.dim() > 1)
        return {"rate": dist.Gamma(self.shape + total, self.prior_rate + x.shape[-1])}

    def _simulate(self, num_data):
        rate = dist.Gamma(self.shape, self.prior_rate).sample()
        return dist.Poisson(rate).sample((num_data,))

    def _describe(self):
        return {
            "shape": round(self.shape, 3),
            "prior_rate": round(self.prior_rate, 3),
            "num_data": self.num_data,
        }


class DiscreteLatentModel(ExactModel):
    """``c_i ~ Categorical(probs)``, ``x_i ~ N(locs[c_i], scale^2)``: a mixture with a
    discrete local latent per datapoint."""

    latent_sites = ("c",)

    def __init__(self, probs, locs, scale, num_data, seed=0):
        self.probs, self.locs, self.scale, self.num_data = probs, locs, float(scale), num_data
        self.data = self.sample_data(seed)

    def model(self, x):
        with pyro.plate("data", x.shape[-1]):
            c = pyro.sample("c", dist.Categorical(self.probs.to(x)))
            pyro.sample("x", dist.Normal(self.locs.to(x)[c], self.scale), obs=x)

    def posterior(self, x):
        log_lik = dist.Normal(self.locs.to(x), self.scale).log_prob(x.unsqueeze(-1))
        return {"c": dist.Categorical(logits=self.probs.to(x).log() + log_lik)}

    def is_local(self, name):
        return True

    def _simulate(self, num_data):
        c = dist.Categorical(self.probs).sample((num_data,))
        return dist.Normal(self.locs[c], self.scale).sample()

    def _describe(self):
        return {"k": len(self.probs), "scale": round(self.scale, 3), "num_data": self.num_data}
