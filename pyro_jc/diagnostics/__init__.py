"""Checks of a fitted amortized guide: simulation-based calibration, a classifier two-sample
test, posterior predictive checks, a misspecification test, and their plots
(:mod:`pyro_jc.diagnostics.plots`, needs matplotlib)."""

from .c2st import c2st
from .misspecification import MisspecificationResult, misspecification_test
from .ppc import posterior_predictive_check
from .sbc import SBCResult, sbc

__all__ = [
    "MisspecificationResult",
    "SBCResult",
    "c2st",
    "misspecification_test",
    "posterior_predictive_check",
    "sbc",
]
