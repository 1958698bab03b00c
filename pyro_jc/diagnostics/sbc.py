"""Simulation-based calibration (Talts et al., 2018) of an amortized guide.

If ``q(z | x)`` is the exact posterior, then for ``(z*, x) ~ p(z, x)`` and ``z_1..z_L ~ q(z |
x)`` the rank of ``z*`` among the ``z_l`` is uniform on ``{0, ..., L}``, for every element of
every latent. A guide that is too narrow piles ranks at the ends; one that is too wide, in the
middle; a biased one, on one side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.poutine as poutine
import torch

from ..layout import ModelLayout
from ..simulation import simulate

_DRAWS_PLATE = "_sbc_draws"
_SIMULATIONS_PLATE = "_sbc_simulations"


@dataclass
class SBCResult:
    """Ranks and their summaries, one column per latent element.

    :ivar torch.Tensor ranks: ``(num_simulations, num_elements)``, values in ``0..L``.
    :ivar list names: element names, ``"site"`` or ``"site[i, j]"``.
    :ivar int num_posterior_samples: ``L``.
    :ivar int num_bins: bins of the uniformity test (they divide ``L + 1`` ranks evenly).
    :ivar torch.Tensor chi2: chi-square statistic of the rank histogram per element.
    :ivar torch.Tensor p_values: its p-value (``num_bins - 1`` degrees of freedom).
    :ivar tuple coverage_levels: credible levels of the central intervals.
    :ivar torch.Tensor coverage: ``(num_elements, len(coverage_levels))``, the fraction of
        simulations whose true value falls in the guide's central interval at each level
        (equal to the level, within Monte-Carlo error, for a calibrated guide).
    """

    ranks: torch.Tensor
    names: list
    num_posterior_samples: int
    num_bins: int
    chi2: torch.Tensor
    p_values: torch.Tensor
    coverage_levels: tuple
    coverage: torch.Tensor
    histograms: torch.Tensor = field(repr=False, default=None)

    def passes(self, level=0.01):
        """Whether no element's uniformity test rejects at ``level`` after a Bonferroni
        correction over the elements (the family-wise error is at most ``level``)."""
        return bool(self.p_values.min() >= level / len(self.names))

    def summary(self):
        """``{name: {"p_value": p, "coverage": {level: fraction}}}``."""
        return {
            name: {
                "p_value": float(self.p_values[i]),
                "coverage": {
                    level: float(self.coverage[i, j])
                    for j, level in enumerate(self.coverage_levels)
                },
            }
            for i, name in enumerate(self.names)
        }


def sbc(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_simulations: int = 1000,
    num_posterior_samples: int = 99,
    batch_size: int | None = None,
    num_bins: int | None = None,
    coverage_levels: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.99),
    observations: dict | Callable | None = None,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> SBCResult:
    """Simulation-based calibration of an amortized ``guide`` for ``model``.

    Simulates ``num_simulations`` pairs ``(z*, x)`` from the model (vectorized, as
    :func:`~pyro_jc.simulate`), draws ``num_posterior_samples`` latents from the guide for
    every simulated ``x`` at once (the guide runs once per batch, inside plates over
    simulations and draws), and ranks each true value among its draws.

    :param model: a Pyro model; ``args``/``kwargs`` as for training (they fix plate sizes).
    :param guide: an amortized guide taking the data through the same argument as the model
        (e.g. :class:`~pyro_jc.AutoAmortizedFlow`); it must sample every latent site.
    :param int num_simulations: number of simulated pairs ``N``.
    :param int num_posterior_samples: draws ``L`` per simulation.
    :param int batch_size: simulations per guide run (default: all).
    :param int num_bins: bins of the chi-square uniformity test; must divide ``L + 1``
        (default: the largest divisor of ``L + 1`` up to ``min(20, N / 5)``).
    :param coverage_levels: credible levels for the coverage of central intervals.
    :param observations: how the simulated data reach the guide (see
        :class:`~pyro_jc.joints.ObservationArguments`).
    :param int max_plate_nesting: the model's plate depth (found from one run if omitted).
    :returns: :class:`SBCResult`.

    The exact posterior of a Beta-Bernoulli model is calibrated:

    >>> import pyro
    >>> from pyro_jc.diagnostics import sbc
    >>> from pyro_jc.testing import BetaBernoulliModel
    >>> pyro.set_rng_seed(0)
    >>> problem = BetaBernoulliModel(2.0, 3.0, num_data=5)
    >>> result = sbc(problem.model, problem.guide, problem.data, num_simulations=200,
    ...              num_posterior_samples=19)
    >>> result.names, tuple(result.ranks.shape), result.passes(0.01)
    (['p'], (200, 1), True)

    **Reference:** Talts, Betancourt, Simpson, Vehtari, Gelman (2018), *Validating Bayesian
    inference algorithms with simulation-based calibration*, arXiv:1804.06788.
    """
    L = num_posterior_samples
    for name, value, least in (
        ("num_simulations", num_simulations, 2),
        ("num_posterior_samples", L, 1),
        ("num_bins", 1 if num_bins is None else num_bins, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"sbc: {name} must be an integer >= {least}, got {value!r}.")
    levels = tuple(coverage_levels)
    if not all(0 < level < 1 for level in levels):
        raise ValueError(f"sbc: coverage_levels must lie in (0, 1), got {levels}.")
    num_bins = _choose_bins(L, num_simulations) if num_bins is None else num_bins
    if (L + 1) % num_bins:
        raise ValueError(
            f"num_bins={num_bins} does not divide the {L + 1} possible ranks evenly; choose "
            f"a divisor of num_posterior_samples + 1."
        )
    # The plate depth and where the data enter the arguments.
    layout = ModelLayout(model, args, kwargs, observations=observations)
    layout.check_observed_shapes()
    nesting = layout.plate_nesting if max_plate_nesting is None else max_plate_nesting
    bank = simulate(
        model, *args, num_simulations=num_simulations, max_plate_nesting=nesting, **kwargs
    )
    names = list(bank["latents"])
    batch_size = batch_size or num_simulations
    ranks = []
    for start in range(0, num_simulations, batch_size):
        part = slice(start, start + batch_size)
        truth = {k: v[part] for k, v in bank["latents"].items()}
        sims = {k: v[part] for k, v in bank["observations"].items()}
        draws = _guide_draws(guide, layout, args, kwargs, sims, L, nesting, names)
        ranks.append(_ranks(draws, truth))
    ranks = torch.cat(ranks)
    element_names = _element_names(bank["latents"])
    return _summarize(ranks, element_names, L, num_bins, tuple(coverage_levels))


def _guide_draws(guide, layout, args, kwargs, sims, num_draws, nesting, names):
    """``{site: (L, n, ...)}``: ``L`` guide draws for each of ``n`` simulated data sets, in
    one guide run inside plates over draws and simulations."""
    n = next(iter(sims.values())).shape[0]
    guide_args, guide_kwargs = layout.substitute(sims, args, kwargs)
    with torch.no_grad(), poutine.block():
        with pyro.plate(_DRAWS_PLATE, num_draws, dim=-nesting - 2):
            with pyro.plate(_SIMULATIONS_PLATE, n, dim=-nesting - 1):
                trace = poutine.trace(guide).get_trace(*guide_args, **guide_kwargs)
    missing = [name for name in names if name not in trace.nodes]
    if missing:
        raise ValueError(
            f"The guide samples no site named {missing}: SBC needs a draw of every latent of "
            "the model from the guide."
        )
    return {name: trace.nodes[name]["value"] for name in names}


def _ranks(draws, truth):
    """``(n, elements)``: how many draws fall below each true value (ties split at random,
    so that discrete latents get uniform ranks too)."""
    columns = []
    for name, z in truth.items():
        samples = draws[name]
        n = z.shape[0]
        target = z.unsqueeze(0)
        expected = (samples.shape[0],) + tuple(z.shape)
        if tuple(samples.shape) != expected:
            raise ValueError(
                f"Guide draws of {name!r} have shape {tuple(samples.shape)}, but draws of the "
                f"model's latent for {n} simulated data sets have shape {expected} (draws, "
                "simulations, then the site's shape): the guide's site has the wrong event "
                "shape or batch dims. It must sample the model's site in the model's batch "
                "layout, treating leading dims of its data argument as a batch."
            )
        below = (samples < target).sum(0)
        ties = (samples == target).sum(0)
        rank = below + (torch.rand(ties.shape, device=ties.device) * (ties + 1)).floor().long()
        columns.append(rank.reshape(n, -1))
    return torch.cat(columns, -1)


def _element_names(latents):
    names = []
    for name, value in latents.items():
        shape = value.shape[1:]
        numel = math.prod(shape)
        if numel == 1:
            names.append(name)
            continue
        for flat in range(numel):
            index, rest = [], flat
            for size in reversed(shape):
                index.append(rest % size)
                rest //= size
            names.append(f"{name}[{', '.join(map(str, reversed(index)))}]")
    return names


def _choose_bins(num_draws, num_simulations):
    cap = max(2, min(20, num_simulations // 5))
    return max(b for b in range(1, cap + 1) if (num_draws + 1) % b == 0)


def _summarize(ranks, names, num_draws, num_bins, levels):
    n = ranks.shape[0]
    per_bin = (num_draws + 1) // num_bins
    bins = torch.div(ranks, per_bin, rounding_mode="floor")
    histograms = torch.stack([torch.bincount(b, minlength=num_bins) for b in bins.T]).to(
        torch.get_default_dtype()
    )
    expected = n / num_bins
    chi2 = ((histograms - expected) ** 2 / expected).sum(-1)
    dof = torch.tensor(float(num_bins - 1), device=chi2.device)
    p_values = torch.special.gammaincc(dof / 2, chi2 / 2) if num_bins > 1 else torch.ones_like(chi2)
    # A true value lies in the central interval of level a iff its rank fraction does. The
    # jittered fraction (rank + U) / (L + 1) is exactly uniform for a calibrated guide, so
    # the expected coverage is exactly the level (the plain rank / L is off by O(1 / L)).
    jitter = torch.rand(ranks.shape, device=ranks.device, dtype=chi2.dtype)
    fraction = (ranks.to(chi2.dtype) + jitter) / (num_draws + 1)
    coverage = torch.stack(
        [
            ((fraction >= (1 - a) / 2) & (fraction <= (1 + a) / 2)).to(chi2.dtype).mean(0)
            for a in levels
        ],
        -1,
    )
    return SBCResult(
        ranks=ranks,
        names=names,
        num_posterior_samples=num_draws,
        num_bins=num_bins,
        chi2=chi2,
        p_values=p_values,
        coverage_levels=levels,
        coverage=coverage,
        histograms=histograms,
    )
