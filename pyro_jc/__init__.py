"""pyro_jc: joint-contrastive variational inference for Pyro.

Every loss compares the model joint ``p(z, x)`` with the guide joint ``q(z | x) k(x)``.
"""

from . import diagnostics, optim  # noqa: E402  (pyro_jc.optim.Adam, pyro_jc.diagnostics.sbc)
from .adversarial import AdversarialELBO
from .autoguides import AutoAmortizedFlow, AutoAmortizedNormal
from .distributions import Implicit
from .elbo import JointContrastiveELBO, JointContrastiveMeanFieldELBO
from .errors import (
    ImplicitDensityError,
    JointContrastiveError,
    MissingGuideSiteError,
    NonFiniteError,
    ObservationArgumentError,
    ObservationShapeError,
    ObservationTypeError,
    PlateShapeError,
    SimulatorError,
    SimulatorWarning,
    UnsampleableSiteError,
    UnsupportedModelError,
    VectorizationWarning,
)
from .forward_kl import ForwardKL
from .iwelbo import JointContrastiveIWELBO
from .posterior import Posterior
from .simulation import simulate

__version__ = "0.2.0.dev0"  # the one place of the version (pyproject.toml reads it)

__all__ = [
    "AdversarialELBO",
    "AutoAmortizedFlow",
    "AutoAmortizedNormal",
    "ForwardKL",
    "Implicit",
    "ObservationArgumentError",
    "ObservationShapeError",
    "ObservationTypeError",
    "UnsampleableSiteError",
    "UnsupportedModelError",
    "SimulatorError",
    "SimulatorWarning",
    "VectorizationWarning",
    "simulate",
    "diagnostics",
    "optim",
    "ImplicitDensityError",
    "JointContrastiveELBO",
    "JointContrastiveError",
    "JointContrastiveIWELBO",
    "JointContrastiveMeanFieldELBO",
    "MissingGuideSiteError",
    "NonFiniteError",
    "PlateShapeError",
    "Posterior",
]
