"""Models with exact posteriors: each holds a Pyro model, a data set simulated from it, and
the exact posterior of every latent site given any data set of that size."""

from __future__ import annotations

from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import torch


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

    def sample_data(self, seed):
        """A data set from the prior predictive, seeded (the global RNG is left as it was)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self._simulate()

    def _simulate(self):
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v}" for k, v in self._describe().items())
        return f"{type(self).__name__}({fields})"

    def _describe(self):
        return {}


class LinearGaussianModel(ExactModel):
    """``z_i ~ N(0, I_d)``, ``x_i ~ N(A z_i + b, sigma^2 I_m)`` for ``n`` datapoints (local
    latents). Data have shape ``(..., n, m)``."""

    latent_sites = ("z",)

    def __init__(self, A, b, sigma, num_data, seed=0):
        self.A, self.b, self.sigma, self.num_data = A, b, float(sigma), num_data
        self.data = self.sample_data(seed)

    def model(self, x):
        d = self.A.shape[1]
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
            loc = z @ self.A.T + self.b
            pyro.sample("x", dist.Normal(loc, self.sigma).to_event(1), obs=x)

    def posterior(self, x):
        d = self.A.shape[1]
        eye = torch.eye(d, dtype=self.A.dtype, device=self.A.device)
        cov = torch.linalg.inv(eye + self.A.T @ self.A / self.sigma**2)
        mean = (x - self.b) @ self.A @ cov.T / self.sigma**2
        return {"z": dist.MultivariateNormal(mean, covariance_matrix=cov)}

    def _site_plates(self, name, x):
        return pyro.plate("data", x.shape[-2], dim=-1)

    def is_local(self, name):
        return True

    def _simulate(self):
        m, d = self.A.shape
        z = torch.randn(self.num_data, d, dtype=self.A.dtype, device=self.A.device)
        eps = torch.randn(self.num_data, m, dtype=self.A.dtype, device=self.A.device)
        return z @ self.A.T + self.b + self.sigma * eps

    def _describe(self):
        return {
            "d": self.A.shape[1],
            "m": self.A.shape[0],
            "sigma": round(self.sigma, 3),
            "num_data": self.num_data,
        }


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

    def _simulate(self):
        p = dist.Beta(self.a, self.b).sample()
        return dist.Bernoulli(p).sample((self.num_data,))

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

    def _simulate(self):
        rate = dist.Gamma(self.shape, self.prior_rate).sample()
        return dist.Poisson(rate).sample((self.num_data,))

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

    def _simulate(self):
        c = dist.Categorical(self.probs).sample((self.num_data,))
        return dist.Normal(self.locs[c], self.scale).sample()

    def _describe(self):
        return {"k": len(self.probs), "scale": round(self.scale, 3), "num_data": self.num_data}
