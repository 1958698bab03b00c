"""pyro_jc: joint-contrastive variational inference for Pyro.

Every loss compares the model joint ``p(z, x)`` with the guide joint ``q(z | x) k(x)``.
"""

from .elbo import JointContrastiveELBO, JointContrastiveMeanFieldELBO
from .errors import (
    ImplicitDensityError,
    JointContrastiveError,
    MissingGuideSiteError,
    NonFiniteError,
    PlateShapeError,
)
from .iwelbo import JointContrastiveIWELBO

__version__ = "0.1.0"

__all__ = [
    "ImplicitDensityError",
    "JointContrastiveELBO",
    "JointContrastiveError",
    "JointContrastiveIWELBO",
    "JointContrastiveMeanFieldELBO",
    "MissingGuideSiteError",
    "NonFiniteError",
    "PlateShapeError",
]
