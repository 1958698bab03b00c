"""Posterior predictive checks: replicate the data from the model at posterior draws of a
fitted guide and compare summary statistics with the observed data (Gelman, Meng and Stern,
1996)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.poutine as poutine
import torch

from ..layout import ModelLayout

_DRAWS_PLATE = "_ppc_draws"


def posterior_predictive_check(
    model: Callable,
    guide: Callable,
    *args: Any,
    statistics: dict[str, Callable],
    num_samples: int = 1000,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> dict:
    """Compare statistics of the observed data with their posterior predictive distribution.

    Draws ``num_samples`` latents from ``guide`` given the data (one vectorized guide run
    in a plate over draws), replays them into the model with its observed sites released
    (:func:`~pyro.poutine.uncondition`), so each draw simulates a replicated data set, and
    evaluates every statistic on the observed and the replicated data.

    :param model: a Pyro model; ``args``/``kwargs`` carry the observed data.
    :param guide: a guide for it (amortized or not).
    :param dict statistics: ``{name: fn}``; ``fn(values)`` maps ``{observed site: data}``
        (one data set, the model's shapes) to a scalar tensor.
    :param int num_samples: posterior draws.
    :param int max_plate_nesting: the model's plate depth (found from one run if omitted).
    :returns: ``{name: {"observed": t, "replicated": (num_samples,) tensor,
        "p_value": P(T(x_rep) >= T(x))}}``; p-values near 0 or 1 flag a misfit.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"posterior_predictive_check: num_samples must be a positive integer, got "
            f"{num_samples!r}."
        )
    if not statistics:
        raise ValueError("posterior_predictive_check needs at least one statistic.")
    layout = ModelLayout(model, args, kwargs)
    observed = layout.observations
    if not observed:
        raise ValueError(
            "The model has no observed site: give the data with pyro.sample(..., obs=data)."
        )
    nesting = layout.plate_nesting if max_plate_nesting is None else max_plate_nesting
    with torch.no_grad(), poutine.block():
        with pyro.plate(_DRAWS_PLATE, num_samples, dim=-nesting - 1):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            replicated = poutine.trace(
                poutine.uncondition(poutine.replay(model, trace=guide_trace))
            ).get_trace(*args, **kwargs)
    results = {}
    for name, statistic in statistics.items():
        t_obs = torch.as_tensor(statistic(observed))
        draws = []
        for i in range(num_samples):
            values = {
                site: _draw(replicated.nodes[site], i, nesting, data)
                for site, data in observed.items()
            }
            draws.append(torch.as_tensor(statistic(values)))
        t_rep = torch.stack(draws).to(t_obs.device)
        if t_rep.dim() != 1:
            raise ValueError(
                f"Statistic {name!r} must return a scalar per data set; got shape "
                f"{tuple(t_rep.shape[1:])}."
            )
        results[name] = {
            "observed": t_obs,
            "replicated": t_rep,
            "p_value": (t_rep >= t_obs).to(torch.get_default_dtype()).mean(),
        }
    return results


def _draw(site, i, nesting, data):
    """Draw ``i`` of a replicated site, in the observed data's shape."""
    value = site["value"]
    dim = value.dim() - len(site["fn"].event_shape) - nesting - 1  # the draws plate
    return value.select(dim, i).reshape(data.shape)
