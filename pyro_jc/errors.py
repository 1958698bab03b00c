"""Exceptions raised by pyro_jc, each naming the offending site and a remedy."""


class JointContrastiveError(ValueError):
    """Base class of every error pyro_jc raises for a bad model, guide or data."""


class ImplicitDensityError(JointContrastiveError, NotImplementedError):
    """A loss needs ``log_prob`` at a site whose distribution can only be sampled."""


class MissingGuideSiteError(JointContrastiveError):
    """A latent site of the model has no matching site in the guide."""


class NonFiniteError(JointContrastiveError, FloatingPointError):
    """A loss, a log density or a guide sample is NaN or infinite."""


class PlateShapeError(JointContrastiveError):
    """A site's batch shape disagrees with the plates that enclose it."""


class ObservationShapeError(JointContrastiveError):
    """An observed site's data do not have the shape of its distribution (batch and event)."""


class SimulatorError(JointContrastiveError):
    """A simulator returned output of the wrong shape, type, or non-finite values."""


class ObservationArgumentError(JointContrastiveError):
    """The argument that carries an observed site's data to the model cannot be found."""


class ObservationTypeError(JointContrastiveError, TypeError):
    """An observed site's data are not a tensor (a numpy array or a list, say)."""


class UnsupportedModelError(JointContrastiveError, NotImplementedError):
    """The model's structure is one that this loss or guide does not cover (a discrete
    latent for an amortized autoguide, say); the message names the site and the way out."""


class UnsampleableSiteError(JointContrastiveError, NotImplementedError):
    """Pairs must be simulated from the model, but a site's distribution cannot be sampled
    (an improper prior such as ``ImproperUniform``)."""


class SimulatorWarning(UserWarning):
    """A simulator raised for some draws, which were dropped (``on_invalid="drop"``)."""


class VectorizationWarning(UserWarning):
    """An observed site does not vary across a plate of simulations: the model may not be
    vectorization-safe (it sums or indexes over the simulations)."""
