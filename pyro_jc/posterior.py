"""A trained amortized guide at one observation, as an object to hand around, and the export
of posterior draws to ArviZ.

:class:`Posterior` fixes the observations of an amortized guide (as sbi's
``posterior.set_default_x``): ``.sample``, ``.log_prob``, ``.sample_and_log_prob``,
``.median``, ``.quantiles``, ``.map``, ``.to(device)``, and
:meth:`Posterior.to_inference_data`. It pickles with its guide (the model must be
picklable: a module-level function or a picklable object).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["Posterior", "check_amortized", "sample_and_log_prob", "to_inference_data"]


class Posterior:
    """The posterior of an amortized guide (:class:`~pyro_jc.AutoAmortizedNormal`,
    :class:`~pyro_jc.AutoAmortizedFlow`, or any guide with the amortized-posterior contract)
    at fixed observations.

    :param guide: a trained amortized guide.
    :param args: the model's arguments carrying the observations (``x_o``); keyword
        arguments likewise.

    .. code-block:: python

        posterior = Posterior(guide, x_o)
        draws = posterior.sample(1000)
        log_q = posterior.log_prob(draws)
        posterior.map(), posterior.quantiles([0.05, 0.95])
    """

    def __init__(self, guide: Any, *args: Any, **kwargs: Any) -> None:
        check_amortized(guide, "Posterior")
        if getattr(guide, "prototype_trace", True) is None:
            raise RuntimeError(
                "Posterior needs a trained guide: train it (or call guide(*args) once with "
                "the model's own arguments) first."
            )
        self.guide = guide
        self.args = args
        self.kwargs = kwargs

    def sample(self, num_samples: int = 1000) -> dict[str, torch.Tensor]:
        """``num_samples`` posterior draws, ``{site: (num_samples, *site_shape)}``."""
        return self.guide.sample_posterior(*self.args, num_samples=num_samples, **self.kwargs)

    def sample_and_log_prob(
        self, num_samples: int = 1000
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``num_samples`` draws with their ``log q(z | x_o)``, ``(num_samples,)`` (see
        :func:`sample_and_log_prob`)."""
        return sample_and_log_prob(self.guide, *self.args, num_samples=num_samples, **self.kwargs)

    def log_prob(self, latents: dict[str, torch.Tensor]) -> torch.Tensor:
        """``log q(z | x_o)`` of a batch of latents (leading dims are the batch)."""
        with torch.no_grad():
            return self.guide.log_prob(latents, *self.args, **self.kwargs)

    def median(self) -> dict[str, torch.Tensor]:
        """The posterior median of each site."""
        return self.guide.median(*self.args, **self.kwargs)

    def quantiles(self, quantiles, **options) -> dict[str, torch.Tensor]:
        """Marginal posterior quantiles of each site (a leading dim over ``quantiles``)."""
        return self.guide.quantiles(quantiles, *self.args, **options, **self.kwargs)

    def map(self, **options) -> dict[str, torch.Tensor]:
        """The posterior mode (see the guide's ``map`` for ``num_samples``, ``num_steps``,
        ``learning_rate``)."""
        return self.guide.map(*self.args, **options, **self.kwargs)

    def to(self, device: torch.device | str) -> Posterior:
        """This posterior with the guide and the observations on ``device`` (the guide is
        moved in place, as :meth:`torch.nn.Module.to` does)."""
        self.guide.to(device)

        def moved(value):
            return value.to(device) if torch.is_tensor(value) else value

        return Posterior(
            self.guide,
            *(moved(a) for a in self.args),
            **{k: moved(v) for k, v in self.kwargs.items()},
        )

    def to_inference_data(self, num_samples: int = 1000, num_chains: int = 1):
        """Posterior draws as ArviZ ``InferenceData`` (see :func:`to_inference_data`)."""
        draws = self.sample(num_samples * num_chains)
        return to_inference_data(
            draws, _observed(self.guide, self.args, self.kwargs), num_chains=num_chains
        )

    def __repr__(self) -> str:
        return f"Posterior({type(self.guide).__name__} at fixed observations)"


def check_amortized(guide: Any, user: str) -> None:
    """Raise a ``TypeError`` naming ``user`` unless ``guide`` has the amortized-posterior
    contract: ``sample_posterior(*args, num_samples=...)`` and ``log_prob(latents, *args)``."""
    for method in ("sample_posterior", "log_prob"):
        if not callable(getattr(guide, method, None)):
            raise TypeError(
                f"{user} needs an amortized guide with a {method}() method "
                f"(AutoAmortizedNormal, AutoAmortizedFlow); got {type(guide).__name__}."
            )


def sample_and_log_prob(
    guide: Any, *args: Any, num_samples: int = 1000, **kwargs: Any
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Draws of an amortized guide at the observations in ``args`` with their
    ``log q(z | x)``: from the guide's own ``sample_and_log_prob`` where it has one (a flow's
    densities then come with its draws, with no second pass through it), else
    ``sample_posterior`` followed by ``log_prob``.

    :param guide: a guide with the amortized-posterior contract (see :func:`check_amortized`).
    :param int num_samples: draws.
    :returns: ``(draws, log_q)``, ``log_q`` of shape ``(num_samples, *leading)``.
    """
    own = getattr(guide, "sample_and_log_prob", None)
    if callable(own):
        return own(*args, num_samples=num_samples, **kwargs)
    draws = guide.sample_posterior(*args, num_samples=num_samples, **kwargs)
    with torch.no_grad():
        return draws, guide.log_prob(draws, *args, **kwargs)


def _observed(guide, args, kwargs):
    """``{observed site: value}`` of the guide's model at these arguments, when the guide
    can say (the amortized autoguides read them with their model layout)."""
    read = getattr(guide, "observations", None)
    return read(*args, **kwargs) if callable(read) else {}


def to_inference_data(
    samples: dict[str, torch.Tensor],
    observed: dict[str, torch.Tensor] | None = None,
    *,
    num_chains: int = 1,
):
    """Posterior draws as ArviZ's ``InferenceData`` (the ``arviz`` extra): a ``posterior``
    group with one variable per latent site, dims ``(chain, draw, *site_shape)``, and the
    observations in ``observed_data``.

    :param dict samples: ``{site: (num_chains * num_draws, *site_shape)}``, e.g. from
        ``guide.sample_posterior(x, num_samples=...)``; draws of independent chains follow
        one another.
    :param dict observed: ``{site: value}`` of the observations (optional).
    :param int num_chains: how many chains the draws are split into (an amortized guide's
        draws are independent, so chains only matter to tools that expect them).
    """
    try:
        with warnings.catch_warnings():
            # ArviZ 0.2x announces its 1.0 refactor at import (a FutureWarning).
            warnings.simplefilter("ignore", FutureWarning)
            import arviz
    except ImportError as e:
        raise ImportError(
            'to_inference_data needs ArviZ, which is not installed: pip install "pyro-jc[arviz]".'
        ) from e
    if not samples:
        raise ValueError("to_inference_data needs at least one site's draws.")
    posterior = {}
    for name, value in samples.items():
        value = torch.as_tensor(value).detach().cpu()
        if value.shape[0] % num_chains:
            raise ValueError(
                f"to_inference_data: {value.shape[0]} draws of {name!r} do not split into "
                f"{num_chains} chains of equal length."
            )
        posterior[name] = value.reshape((num_chains, -1) + value.shape[1:]).numpy()
    observed_data = {
        name: torch.as_tensor(value).detach().cpu().numpy()
        for name, value in (observed or {}).items()
    }
    return arviz.from_dict(posterior=posterior, observed_data=observed_data or None)
