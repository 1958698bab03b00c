"""Checks of a fitted amortized guide: simulation-based calibration, a classifier two-sample
test, posterior predictive checks, and their plots (:mod:`pyro_jc.diagnostics.plots`,
needs matplotlib)."""

from .c2st import c2st
from .ppc import posterior_predictive_check
from .sbc import SBCResult, sbc

__all__ = ["SBCResult", "c2st", "posterior_predictive_check", "sbc"]
