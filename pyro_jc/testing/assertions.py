"""Assertions for tests of inference: moments against exact posteriors within Monte-Carlo
error, and calibration by SBC."""

from __future__ import annotations

import pyro.distributions as dist
import torch

from ..diagnostics import sbc


def assert_posterior_moments_close(samples, posterior, *, sigmas=5.0, tolerance=0.0):
    """Check draws against an exact posterior, element by element: means within ``sigmas``
    Monte-Carlo standard errors ``sqrt(var / S)``, variances within ``sigmas`` standard
    errors of the sample variance ``sqrt((m4 - var^2) / S)`` (``m4`` the draws' fourth
    central moment); for categorical sites, the frequency of every category within
    ``sigmas`` binomial standard errors.

    :param dict samples: ``{site: (S, ...) draws}``, the draws along dim 0.
    :param dict posterior: ``{site: distribution}`` whose batch and event shapes match one draw.
    :param float sigmas: tolerance in standard errors (5 keeps false alarms rare across many
        elements; a Bonferroni bound: 5 SE is a two-sided 5.7e-7 per element).
    :param float tolerance: an approximation error allowed on top, as a fraction of the
        exact standard deviation (means), variance (variances) or of 1 (probabilities): 0
        for exact samplers, e.g. 0.2 for a trained amortized guide.
    :raises AssertionError: naming the site, the element and both values.

    >>> import torch
    >>> from pyro_jc.testing import BetaBernoulliModel, assert_posterior_moments_close
    >>> _ = torch.manual_seed(0)
    >>> problem = BetaBernoulliModel(2.0, 2.0, num_data=10, seed=0)
    >>> posterior = problem.posterior(problem.data)
    >>> assert_posterior_moments_close({"p": posterior["p"].sample((4000,))}, posterior)
    """
    for name, exact in posterior.items():
        draws = samples[name]
        S = draws.shape[0]
        if isinstance(exact, dist.Categorical):
            k = exact.probs.shape[-1]
            freq = torch.nn.functional.one_hot(draws.long(), k).to(exact.probs).mean(0)
            se = (exact.probs * (1 - exact.probs) / S).sqrt()
            _check(name, "probability", freq, exact.probs, se, sigmas, tolerance)
            continue
        draws = draws.to(exact.mean.dtype)
        mean, var = exact.mean, exact.variance
        _check(name, "mean", draws.mean(0), mean, (var / S).sqrt(), sigmas, tolerance * var.sqrt())
        centered = draws - draws.mean(0)
        m4 = centered.pow(4).mean(0)
        se_var = ((m4 - var**2).clamp(min=0) / S).sqrt()
        variance = centered.pow(2).sum(0) / (S - 1)
        _check(name, "variance", variance, var, se_var, sigmas, tolerance * var)


def _check(name, what, estimate, exact, se, sigmas, tolerance):
    estimate, exact = torch.broadcast_tensors(estimate, exact)
    allowed = sigmas * se.expand_as(exact) + tolerance + 1e-6 * exact.abs().clamp(min=1)
    se = se.expand_as(exact)
    bad = (estimate - exact).abs() > allowed
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"Site {name!r}: {what} of element {i} is {estimate.flatten()[i].item():.5g}, exact "
            f"{exact.flatten()[i].item():.5g}, beyond {sigmas} Monte-Carlo standard errors "
            f"({se.flatten()[i].item():.3g}); {int(bad.sum())} of {bad.numel()} elements off."
        )


def assert_calibrated(model, guide, *args, level=0.01, **kwargs):
    """Run :func:`~pyro_jc.diagnostics.sbc` and fail if any element's rank-uniformity test
    rejects at ``level`` (Bonferroni over elements). Keyword arguments go to ``sbc``.

    :returns: the :class:`~pyro_jc.diagnostics.SBCResult`.
    :raises AssertionError: listing the worst elements' p-values and 90% coverage.
    """
    result = sbc(model, guide, *args, **kwargs)
    if not result.passes(level):
        worst = result.p_values.argsort()[:3].tolist()
        levels = list(result.coverage_levels)
        column = levels.index(0.9) if 0.9 in levels else len(levels) - 1
        details = ", ".join(
            f"{result.names[i]}: p={result.p_values[i].item():.2g}, coverage at "
            f"{levels[column]}: {result.coverage[i, column].item():.3f}"
            for i in worst
        )
        raise AssertionError(
            f"The guide is not calibrated at level {level} (SBC, {result.ranks.shape[0]} "
            f"simulations, Bonferroni over {len(result.names)} elements): {details}."
        )
    return result
