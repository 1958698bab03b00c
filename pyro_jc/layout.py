"""The one inspection of a model: its sites, data plate, plate nesting and where the
observations enter its arguments, found from one run with the data observed.

Every loss, guide and diagnostic that needs to know a model's structure asks
:class:`ModelLayout` (through a :class:`LayoutCache`, which runs the model once per
model and argument shapes), so that the rules live in one place and a change of the
arguments' shapes (another data-set size) is never served a stale answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pyro.poutine as poutine
import torch

from .errors import NonFiniteError, ObservationTypeError
from .joints import (
    ObservationArguments,
    check_observed_shapes,
    data_frames,
    find_data_plate,
    latent_sites,
    num_datapoints,
    observed_values,
    sample_sites,
    trace_model,
)

__all__ = ["LayoutCache", "ModelLayout"]


class ModelLayout:
    """The structure of ``model(*args, **kwargs)``, from one run with the data observed
    (which simulates nothing; ``param`` statements create the model's parameters as any run
    would).

    :param callable model: a Pyro model.
    :param tuple args: its positional arguments (the real data where the data go).
    :param dict kwargs: its keyword arguments.
    :param observations: which argument carries each observed site's data (see
        :class:`~pyro_jc.joints.ObservationArguments`); found automatically by default, and
        only when first needed (:attr:`locations`).
    :param str data_plate: the name of the plate over datapoints (default: the outermost
        plate shared by every observed site).

    :ivar trace: the model trace of that run (sites with their distributions and values).
    :ivar list latent_sites: names of the sample sites without data, in execution order.
    :ivar list observed_sites: names of the sample sites with data (``obs=``).
    :ivar dict observations: ``{observed site: data}``.
    :ivar dict event_dims: ``{sample site: len(event_shape)}``.
    :ivar data_plate: the plate over datapoints (a ``CondIndepStackFrame``) or ``None``.
    :ivar int num_datapoints: the data plate's full size (1 without one).
    :ivar int plate_nesting: the depth of the model's vectorized plates (a particle plate
        around the call, such as the ELBOs' ``num_particles_vectorized``, not counted).
    :ivar list params: names of the model's ``param`` sites.
    """

    def __init__(
        self,
        model: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        observations: dict | Callable | None = None,
        data_plate: str | None = None,
    ) -> None:
        kwargs = {} if kwargs is None else kwargs
        self.model = model
        # Gradients on, so that parameters show whether they are learnable.
        with torch.enable_grad(), poutine.block():
            trace = trace_model(model, args, kwargs)
        self.trace = trace
        _check_observations(trace)
        sites = sample_sites(trace)
        self.latent_sites = [s["name"] for s in latent_sites(trace)]
        self.observed_sites = [s["name"] for s in sites if s["is_observed"]]
        self.observations = observed_values(trace)
        self.event_dims = {s["name"]: len(s["fn"].event_shape) for s in sites}
        self.data_plate = find_data_plate(trace, data_plate)
        self.num_datapoints = num_datapoints(self.data_plate)
        # The depth of the model's own plates (not of a particle plate the call is inside).
        dims = [f.dim for site in sites for f in data_frames(site)]
        self.plate_nesting = -min(dims) if dims else 0
        self.params = [name for name, site in trace.nodes.items() if site["type"] == "param"]
        self.arguments = ObservationArguments(model, observations)
        self._args, self._kwargs = args, kwargs
        self._locations = None

    @property
    def locations(self) -> dict:
        """``{observed site: ("arg", position) or ("kwarg", name)}``: where each site's data
        enter the arguments.

        :raises ObservationArgumentError: an argument cannot be told (see
            :class:`~pyro_jc.joints.ObservationArguments`).
        """
        if self._locations is None:
            self._locations = self.arguments.locate(self.observations, self._args, self._kwargs)
        return self._locations

    def site(self, name):
        """The prototype trace's site ``name``."""
        return self.trace.nodes[name]

    def check_observed_shapes(self, leading_dims: bool = False) -> None:
        """Raise :class:`~pyro_jc.ObservationShapeError` for data shaped unlike their site's
        distribution (see :func:`~pyro_jc.joints.check_observed_shapes`).

        :param bool leading_dims: allow extra leading dims (a batch of observations)."""
        check_observed_shapes(self.trace, leading_dims)

    def read(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """``{observed site: data}`` read from the arguments of another call."""
        return ObservationArguments.read(self.locations, args, kwargs)

    def substitute(self, values: dict, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments ``(args, kwargs)`` with each observed site's data replaced by
        ``values[site]`` (e.g. simulations with leading batch dims), at the places this
        layout's own call had them."""
        locations = None if callable(self.arguments.observations) else self.locations
        return self.arguments.substitute(locations, values, args, kwargs)


class LayoutCache:
    """The :class:`ModelLayout` of a model for given arguments, computed once per model and
    argument signature (shapes, dtypes and devices of tensors, other arguments by value or
    identity), so a loss asked again with data of the same shapes runs nothing, and data of
    new shapes get a fresh layout.

    :param observations: passed to every :class:`ModelLayout`.
    :param int size: layouts kept (the most recently used).
    """

    def __init__(self, observations: dict | Callable | None = None, size: int = 8) -> None:
        self.observations = observations
        self.size = size
        self._layouts = OrderedDict()

    def __call__(self, model: Callable, args: tuple, kwargs: dict) -> ModelLayout:
        key = (model, _signature(args, kwargs))
        layout = self._layouts.get(key)
        if layout is None:
            layout = ModelLayout(model, args, kwargs, observations=self.observations)
            self._layouts[key] = layout
            if len(self._layouts) > self.size:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return layout


def _signature(args, kwargs):
    return tuple(_describe(v) for v in args) + tuple(
        (k, _describe(v)) for k, v in sorted(kwargs.items())
    )


def _describe(value):
    if torch.is_tensor(value):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_describe(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return ("value", value)


def _check_observations(trace):
    """Data that no loss can use, refused before any step: not a tensor, or NaN or inf where
    the site is not masked out."""
    for site in sample_sites(trace):
        if not site["is_observed"]:
            continue
        name, value = site["name"], site["value"]
        if not torch.is_tensor(value):
            raise ObservationTypeError(
                f"Observed site {name!r}: the data are a {type(value).__name__}, not a "
                "torch.Tensor. Pass torch.as_tensor(data) (on the device and in the dtype "
                "the model computes in)."
            )
        if not value.is_floating_point() and not value.is_complex():
            continue
        bad = ~torch.isfinite(value)
        # Masked-out entries may hold anything (obs_mask= puts a MaskedDistribution there).
        event_dims = len(site["fn"].event_shape)
        for mask in (site["mask"], getattr(site["fn"], "_mask", None)):
            if mask is not None and mask is not True:
                mask = torch.as_tensor(mask, device=value.device)
                bad = bad & mask.reshape(mask.shape + (1,) * event_dims)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise NonFiniteError(
                f"Observed site {name!r}: {int(bad.sum())} of its {value.numel()} data values "
                f"are NaN or inf (the first at index {first}). Drop or impute them, or mask "
                "them out with obs_mask= or poutine.mask."
            )
