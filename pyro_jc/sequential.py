"""Sequential neural posterior estimation for one observation with truncated proposals
(TSNPE, Deistler et al. 2022).

Round 1 simulates from the prior; every later round draws parameters from the prior
truncated to the current guide's highest-density region at the observation ``x_o``,
simulates them and trains :class:`~pyro_jc.ForwardKL` on the pairs of all rounds. Inside
the region the truncated prior is proportional to the prior, so the forward-KL loss needs
no correction: the guide learns the posterior wherever the region holds its mass (all of
it, up to the ``quantile`` left out). The region is the guide's own:
``{z : log q(z | x_o) >= tau}``, ``tau`` the ``quantile`` of ``log q`` at the guide's draws
(an exact test for any guide with a density); the truncated prior is sampled by rejection
from the prior, whose acceptance rate is reported.

References

[1] Truncated proposals for scalable and hassle-free simulation-based inference,
M. Deistler, P. J. Goncalves, J. H. Macke (2022)

[2] Automatic posterior transformation for likelihood-free inference, D. S. Greenberg,
M. Nonnenmacher, J. H. Macke (2019)
"""

from __future__ import annotations

import copy
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.infer import SVI
from pyro.optim import PyroOptim

from .errors import JointContrastiveError
from .forward_kl import ForwardKL
from .joints import check_num_particles, prior_latents
from .layout import ModelLayout
from .posterior import check_amortized, sample_and_log_prob
from .simulation import SimulationBank, simulate
from .training import check_average

__all__ = ["TruncatedPrior", "TruncationError", "fit_sequential"]


class TruncationError(JointContrastiveError):
    """The truncated prior's acceptance rate fell below its floor: the guide's region holds
    too little prior mass to be found by rejection."""


class TruncatedPrior:
    """The model's prior truncated to a guide's highest-density region at fixed observations:
    ``p(z) 1[log q(z | x_o) >= tau] / Z``.

    :param model: the Pyro model.
    :param guide: an amortized guide with ``sample_posterior`` and ``log_prob``
        (:class:`~pyro_jc.AutoAmortizedNormal`, :class:`~pyro_jc.AutoAmortizedFlow`).
    :param args: the model's arguments carrying the observations ``x_o``; keyword
        arguments likewise.
    :param float quantile: the share of the guide's own mass left outside the region
        (TSNPE's ``epsilon``; 1e-4 by default, as sbi's ``get_density_thresholder``).
    :param int num_threshold_samples: guide draws the threshold is the quantile of (at the
        default quantile, 100,000 leave ten draws below it; sbi takes 1,000,000), drawn
        in chunks that fit a CPU's cache (in one batch on an accelerator).
    :param float min_acceptance: the rejection sampler's acceptance-rate floor; below it
        :meth:`sample` raises :class:`TruncationError`.
    :param int batch_size: prior draws per rejection round (default: adapted to the
        acceptance rate seen so far).
    """

    def __init__(
        self,
        model: Callable,
        guide: Any,
        *args: Any,
        quantile: float = 1e-4,
        num_threshold_samples: int = 100_000,
        min_acceptance: float = 1e-4,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0 <= quantile < 1:
            raise ValueError(f"quantile must lie in [0, 1), got {quantile}.")
        if num_threshold_samples < 1 or not 0 < min_acceptance <= 1:
            raise ValueError(
                "num_threshold_samples must be >= 1 and min_acceptance in (0, 1]; got "
                f"{num_threshold_samples} and {min_acceptance}."
            )
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.quantile = quantile
        self.min_acceptance = min_acceptance
        self.batch_size = batch_size
        layout = ModelLayout(model, args, kwargs)
        layout.check_observed_shapes()  # one observation: a region is for one x_o
        self._nesting = layout.plate_nesting
        check_amortized(guide, "TruncatedPrior")
        log_q = self._threshold_draws(num_threshold_samples)
        #: The region's threshold ``tau`` on ``log q(z | x_o)``.
        self.threshold = float(torch.quantile(log_q.double(), quantile)) if quantile else -math.inf
        #: Prior draws proposed and accepted so far.
        self.num_proposed = self.num_accepted = 0

    def _threshold_draws(self, num):
        """``log q(z | x_o)`` at ``num`` guide draws, drawn in chunks of ``_DRAW_CHUNK``
        where the guide runs on a CPU: ``(num,)``."""
        parts, done, rows = [], 0, min(num, _DRAW_CHUNK)
        while done < num:
            size = min(rows, num - done)
            _, log_q = sample_and_log_prob(self.guide, *self.args, num_samples=size, **self.kwargs)
            parts.append(log_q.reshape(size))
            done += size
            if log_q.device.type != "cpu":  # an accelerator is fastest on one batch
                rows = num
        return torch.cat(parts)

    @property
    def acceptance_rate(self) -> float:
        """The share of prior draws that fell in the region so far (NaN before any)."""
        return self.num_accepted / self.num_proposed if self.num_proposed else math.nan

    def log_q(self, latents: dict[str, torch.Tensor]) -> torch.Tensor:
        """``log q(z | x_o)`` of latents in a bank's layout (draws along dim 0): ``(n,)``."""
        first = next(iter(latents.values()))
        num = len(first)
        if not num:  # torch's log_prob cannot sum an empty batch's events
            return first.new_empty(0)
        rows = num if first.device.type != "cpu" else _chunk_rows(latents)
        parts = []
        with torch.no_grad():
            for start in range(0, num, rows):
                chunk = {k: v[start : start + rows] for k, v in latents.items()}
                log_q = self.guide.log_prob(chunk, *self.args, **self.kwargs)
                parts.append(log_q.reshape(min(rows, num - start)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def contains(self, latents: dict[str, torch.Tensor]) -> torch.Tensor:
        """Whether each of the latents (draws along dim 0) lies in the region: ``(n,)``."""
        return self.log_q(latents) >= self.threshold

    def sample(self, num_samples: int) -> dict[str, torch.Tensor]:
        """``num_samples`` draws of the truncated prior by rejection from the prior, in a
        bank's layout (what :func:`~pyro_jc.simulate` takes as ``latents=``).

        :raises TruncationError: the acceptance rate fell below ``min_acceptance``.
        """
        kept, count = [], 0
        while count < num_samples:
            rate = self.acceptance_rate if self.num_accepted else None
            size = self.batch_size or _proposal_size(num_samples - count, rate)
            draws = prior_latents(self.model, self.args, self.kwargs, size, self._nesting)
            inside = self.contains(draws)
            self.num_proposed += size
            self.num_accepted += int(inside.sum())
            if inside.any():
                kept.append({k: v[inside] for k, v in draws.items()})
                count += int(inside.sum())
            if self.num_proposed >= 10 / self.min_acceptance and (
                self.acceptance_rate < self.min_acceptance
            ):
                raise TruncationError(
                    f"TruncatedPrior: {self.num_accepted} of {self.num_proposed} prior draws "
                    f"fell in the guide's region (acceptance {self.acceptance_rate:.2e}, below "
                    f"min_acceptance={self.min_acceptance:g}): the region holds almost no "
                    "prior mass. Train longer in the earlier rounds (the guide may be "
                    "overconfident), lower min_acceptance, or use fewer rounds."
                )
        return {k: torch.cat([part[k] for part in kept])[:num_samples] for k in kept[0]}


# The region's bulk work on a CPU runs in chunks whose intermediates stay in the cache, where
# one batch of 100,000 does not (docs/benchmarks.rst, "Flow draws with their densities").
# Densities (the rejection test) scale with the latent's size: about 2**14 latent elements
# a chunk were fastest on sbibm's two- and ten-dimensional tasks. A draw of an
# autoregressive flow fixes one coordinate a pass, so its intermediates do not grow with
# the latent: 10,000 draws a chunk were fastest on both.
_CHUNK_ELEMENTS = 2**14
_DRAW_CHUNK = 10_000


def _latent_size(latents):
    """Elements of one draw of latents in a bank's layout (draws along dim 0)."""
    return sum(v.shape[1:].numel() for v in latents.values())


def _chunk_rows(latents):
    """Draws per chunk for latents in a bank's layout (draws along dim 0)."""
    return max(1, _CHUNK_ELEMENTS // max(_latent_size(latents), 1))


def _proposal_size(missing, rate):
    """Prior draws for one rejection round: enough for ``missing`` at the rate seen so far
    (with a margin), at least 1,000, at most a million."""
    if rate is None:
        return max(1000, missing)
    return int(min(max(1000, 1.2 * missing / max(rate, 1e-6)), 1_000_000))


def fit_sequential(
    model: Callable,
    guide: Any,
    *args: Any,
    num_simulations: int | Sequence[int],
    num_rounds: int | None = None,
    optim: Any = None,
    fresh_optimizer: bool = True,
    quantile: float = 1e-4,
    num_particles: int | None = None,
    validation_fraction: float = 0.1,
    average: float | None = 0.98,
    retrain: str | float = "auto",
    max_epochs: int | None = None,
    num_workers: int = 1,
    simulate_options: dict | None = None,
    fit_options: dict | None = None,
    truncation_options: dict | None = None,
    callback: Callable | None = None,
    **kwargs: Any,
) -> dict:
    """Train an amortized ``guide`` on ``model``'s posterior at the observations in ``args``
    in ``num_rounds`` rounds of truncated sequential NPE (see the module's description).

    The budget ``num_simulations`` is split evenly over ``num_rounds`` rounds (sbibm's
    protocol: ten), or given per round as a sequence. Each round trains
    :class:`~pyro_jc.ForwardKL` on the pairs of all rounds so far with
    :meth:`~pyro_jc.ForwardKL.fit` (early stopping on the pairs held out so far: each
    round's pairs are split once, so no round validates on pairs another trained on), and
    the guide's standardization is fitted once, from round 1's prior simulations.

    :param model: the Pyro model (any model :func:`~pyro_jc.simulate` takes: several latent
        sites, bounded priors, implicit likelihoods).
    :param guide: the amortized guide to train.
    :param args: the model's arguments, with the observations ``x_o`` where the data go.
    :param num_simulations: the total simulation budget (an int), or the simulations of
        each round (a sequence of ints: ``[1000, 250, 250]`` spends more on the prior).
    :param int num_rounds: rounds for an int budget (default 10; 1: one-round NPE on the
        prior).
    :param optim: the optimizer (default: ``pyro_jc.optim.Adam({"lr": 1e-3})``).
    :param bool fresh_optimizer: start each round with a fresh copy of ``optim`` (its
        moment estimates reset, as sbi creates a new optimizer for each round), leaving
        ``optim`` itself unstepped; ``False`` carries one optimizer's state through the
        rounds. Fresh copies train better: on sbibm's ``two_moons`` at 1,000 simulations
        they lowered the reference cross-entropy in 18 of 20 runs (see the benchmarks page).
    :param float quantile: the region's excluded guide mass (see :class:`TruncatedPrior`).
    :param int num_particles: pairs per training step (default: a twentieth of the round's
        training pairs, at least 50 and at most 200). Small banks train better with small
        minibatches: at 1,000 simulations on sbibm's ``two_moons``, 50 instead of sbi's
        default 200 lowered the C2ST by 0.034 ± 0.014 (see the benchmarks page); large banks
        keep 200, which is faster.
    :param float validation_fraction: share of each round's pairs held out for validation,
        in every later round too (a round too small to hold a pair out trains on all).
    :param float average: each round validates, keeps and leaves behind an exponential
        moving average of the guide's parameters with this decay per step (``average`` of
        :func:`~pyro_jc.training.fit`; ``None``: the last step's parameters). Averaging
        smooths the noise of the small minibatches: at 1,000 simulations on sbibm's
        ``two_moons`` it lowered the C2ST by 0.030 ± 0.010 (23 of 30 paired runs; see the
        benchmarks page), at about a third more epochs.
    :param retrain: which rounds train from fresh initial weights
        (:meth:`~pyro_jc.autoguides.AutoAmortizedGuide.reset_parameters`) instead of going
        on from the previous round's: a rate in (0, 1], each round whose truncated prior
        accepted at least that share of the prior's draws (its region keeps that much of the
        prior, so its proposals are close to prior draws); ``"auto"`` (default), for a guide
        with ``reset_parameters``, the rate ``0.5 ** (d / 2)`` for latents of ``d`` elements
        (a region keeping ``1 / sqrt(2)`` of the prior or more along each dimension, as a
        geometric mean: half the prior in two dimensions, 3 % of it in ten), and ``"never"``
        for one without (or with a network it cannot reset); ``"never"``; ``"last"`` (the
        guide returned is trained from scratch on all rounds' pairs, while the earlier
        rounds, which only place the regions, go on from the weights before); or ``"every"``
        (every round after the first, as sbi's ``retrain_from_scratch``). Warm starts cost
        accuracy where the posterior is almost as broad as the prior: on sbibm's
        ten-dimensional ``gaussian_linear`` at 1,000 simulations, whose regions mostly keep
        two thirds of the prior or more (0.96 of it along each dimension), fresh weights
        lowered the C2ST from 0.644 to 0.593 (15 paired runs, lower on 13), while on
        ``two_moons``, whose regions keep less than half of it (0.71 along each dimension)
        after a round or two, they did not help and trained longer (see the benchmarks
        page). The weights are reset after the round's proposals are drawn and before its
        simulations, so a guide that cannot be reset fails before they are spent (``"auto"``
        warns instead, and goes on from the current weights).
    :param int max_epochs: bounds each round's training (default: early stopping only).
    :param int num_workers: simulation worker processes (see :func:`~pyro_jc.simulate`).
    :param dict simulate_options: more arguments of :func:`~pyro_jc.simulate`.
    :param dict fit_options: more arguments of :meth:`~pyro_jc.ForwardKL.fit`.
    :param dict truncation_options: more arguments of :class:`TruncatedPrior`
        (``num_threshold_samples``, ``min_acceptance``, ``batch_size``).
    :param callback: called after each round with ``(round, guide, history)``.
    :returns: a history: ``"rounds"``, a list with per round the ``simulations`` drawn, the
        truncated prior's ``acceptance_rate`` and ``threshold`` (NaN and ``-inf`` in round 1),
        whether it started from fresh weights (``retrained``),
        the pairs per step (``num_particles``), the ``epochs`` trained, the best
        ``validation_loss``, and the seconds spent truncating, simulating and training
        (``truncate_seconds``, ``simulate_seconds``, ``train_seconds``); ``"simulations"``,
        the total.
    """
    sizes = _round_sizes(num_simulations, num_rounds)
    if optim is None:
        from . import optim as jc_optim

        optim = jc_optim.Adam({"lr": 1e-3})
    if not isinstance(optim, PyroOptim):
        raise ValueError(
            "fit_sequential: optim must be a Pyro optimizer (pyro.optim.Adam, "
            f"pyro_jc.optim.Adam, ...), got {type(optim).__name__}."
        )
    if fresh_optimizer and optim.get_state():
        # A copy of a stepped optimizer would copy the parameters its state refers to.
        raise ValueError(
            "fit_sequential(fresh_optimizer=True) gives each round a fresh copy of optim, "
            "which must not have stepped yet: pass a new optimizer, or "
            "fresh_optimizer=False to go on with this one's state."
        )
    _check_retrain(retrain)
    auto = retrain == "auto"
    if auto and not callable(getattr(guide, "reset_parameters", None)):
        retrain = "never"
    if len(sizes) > 1:
        check_amortized(guide, "fit_sequential")  # checks before any simulation is spent
        if retrain != "never" and not callable(getattr(guide, "reset_parameters", None)):
            raise ValueError(
                f"fit_sequential(retrain={retrain!r}) trains rounds from fresh weights, which "
                f"needs guide.reset_parameters(); {type(guide).__name__} has none. Give it one, "
                "or pass retrain='never'."
            )
    if num_particles is not None:
        check_num_particles(num_particles)
    check_average(average)
    shared = sorted({"average", "max_epochs"} & set(fit_options or {}))
    if shared:
        raise ValueError(
            f"fit_sequential: give {', '.join(shared)} to fit_sequential itself, not in "
            "fit_options."
        )
    if not 0 < validation_fraction < 1:
        raise ValueError(
            f"fit_sequential: validation_fraction must lie in (0, 1), got {validation_fraction}."
        )
    train, held_out, history = [], [], {"rounds": [], "simulations": 0}
    for r, size in enumerate(sizes):
        entry = {
            "round": r + 1,
            "acceptance_rate": math.nan,
            "threshold": -math.inf,
            "retrained": False,
        }
        latents = None
        start = time.perf_counter()
        if r:
            truncated = TruncatedPrior(
                model, guide, *args, quantile=quantile, **(truncation_options or {}), **kwargs
            )
            latents = truncated.sample(size)
            entry["acceptance_rate"] = truncated.acceptance_rate
            entry["threshold"] = truncated.threshold
            entry["retrained"] = _retrains(
                retrain, r == len(sizes) - 1, entry["acceptance_rate"], _latent_size(latents)
            )
            if entry["retrained"]:
                try:
                    guide.reset_parameters()
                except TypeError as error:  # a network it cannot reset; nothing changed
                    if not auto:
                        raise
                    warnings.warn(
                        f"fit_sequential(retrain='auto') goes on from the current weights in "
                        f"every round: {error}",
                        stacklevel=2,
                    )
                    retrain, entry["retrained"] = "never", False
        entry["truncate_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        bank = simulate(
            model,
            *args,
            num_simulations=size,
            latents=latents,
            num_workers=num_workers,
            **(simulate_options or {}),
            **kwargs,
        )
        entry["simulate_seconds"] = time.perf_counter() - start
        bank = SimulationBank(bank)
        entry["simulations"] = len(bank)
        history["simulations"] += entry["simulations"]
        # Split each round once: a fresh split of the grown bank would validate on pairs
        # earlier rounds trained on, which read optimistic.
        if r and not 0 < round(validation_fraction * len(bank)) < len(bank):
            train.append(bank)  # a later round too small to hold a pair out trains on all
        else:
            train_part, held_out_part = bank.split(validation_fraction)
            train.append(train_part)
            held_out.append(held_out_part)
        batch = num_particles
        if batch is None:
            batch = _default_batch(sum(len(b) for b in train))
        loss = ForwardKL(
            num_particles=batch,
            simulations=_joined(train),
            validation_simulations=_joined(held_out),
        )
        svi = SVI(model, guide, copy.deepcopy(optim) if fresh_optimizer else optim, loss)
        start = time.perf_counter()
        fitted = loss.fit(
            svi, *args, max_epochs=max_epochs, average=average, **(fit_options or {}), **kwargs
        )
        entry["train_seconds"] = time.perf_counter() - start
        entry["num_particles"] = loss.num_particles
        entry["epochs"] = fitted["epochs"]
        entry["validation_loss"] = min(fitted["validation_loss"], default=math.nan)
        history["rounds"].append(entry)
        if callback is not None:
            callback(r + 1, guide, history)
    return history


_RETRAIN = ("auto", "never", "last", "every")

#: ``fit_sequential(retrain="auto")``: a round trains from fresh weights when its region keeps
#: ``_AUTO_RETRAIN_RATE ** (d / 2)`` of the prior or more, ``d`` the latent elements: this
#: share in two dimensions, its square root along each dimension in any number.
_AUTO_RETRAIN_RATE = 0.5


def _check_retrain(retrain):
    if isinstance(retrain, str):
        if retrain in _RETRAIN:
            return
    elif isinstance(retrain, numbers.Real) and not isinstance(retrain, bool):
        if 0 < retrain <= 1:
            return
    raise ValueError(
        f"fit_sequential: retrain must be one of {_RETRAIN} or an acceptance rate in (0, 1], "
        f"got {retrain!r}."
    )


def _retrains(retrain, last, acceptance_rate, latent_size):
    """Whether a round after the first trains from fresh weights, its truncated prior having
    accepted ``acceptance_rate`` of the prior's draws of ``latent_size`` elements."""
    if retrain == "every":
        return True
    if retrain == "last":
        return last
    if retrain == "never":
        return False
    # The region keeps this much of the prior or more: the round's proposals are close to
    # prior draws, as one-round NPE's, where a warm start generalizes worse. "auto" asks it
    # per dimension: in ten, a region keeping 40 % of the prior is 9 % narrower along each
    # axis, closer to the prior than one keeping half of it in two (29 % narrower).
    if retrain == "auto":
        retrain = _AUTO_RETRAIN_RATE ** (latent_size / 2)
    return acceptance_rate >= retrain


def _default_batch(pairs):
    """Pairs per step for a round with ``pairs`` training pairs: about 20 steps an epoch."""
    return min(200, max(50, pairs // 20))


def _is_count(n):
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1


def _round_sizes(num_simulations, num_rounds):
    """The simulations of each round, from a total and a number of rounds or a sequence."""
    if isinstance(num_simulations, Sequence):
        sizes = list(num_simulations)
        if not sizes or not all(_is_count(n) for n in sizes):
            raise ValueError(
                "num_simulations as a sequence gives each round's simulations: positive ints, "
                f"got {num_simulations!r}."
            )
        if num_rounds is not None and num_rounds != len(sizes):
            raise ValueError(
                f"num_rounds={num_rounds} disagrees with the {len(sizes)} rounds of "
                "num_simulations; give one or the other."
            )
        return [int(n) for n in sizes]
    num_rounds = 10 if num_rounds is None else num_rounds
    if not _is_count(num_rounds):
        raise ValueError(f"num_rounds must be a positive int, got {num_rounds!r}.")
    if not _is_count(num_simulations):
        raise ValueError(
            f"num_simulations must be a positive int or a sequence of them, got "
            f"{num_simulations!r}."
        )
    if num_simulations < num_rounds:
        raise ValueError(
            f"num_simulations={num_simulations} cannot be split over {num_rounds} rounds."
        )
    return [
        num_simulations // num_rounds + (r < num_simulations % num_rounds)
        for r in range(num_rounds)
    ]


def _joined(banks):
    return {
        part: {k: torch.cat([getattr(b, part)[k] for b in banks]) for k in getattr(banks[0], part)}
        for part in ("latents", "observations")
    }
