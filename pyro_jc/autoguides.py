"""Amortized autoguides: guides built from a model alone that map observations to a posterior
over every latent site (a diagonal normal or a conditional normalizing flow).

Every latent is mapped to unconstrained space with :func:`~torch.distributions.biject_to`
(or, for intervals, optionally :class:`~pyro_jc.transforms.SoftIntervalTransform`, or the unit
box that a flow's last layers clamp into and reshape: ``interval_transform="box"``), the
unconstrained values are joined into one vector ``u`` and ``q(u | x)`` is a distribution
conditioned on an embedding of the (standardized) observations. Samples are pushed back
through the bijections, so they never leave a bounded prior's support.

The guides work with :class:`~pyro_jc.ForwardKL` (which replays simulated latents into the
guide: the joint density is evaluated at the latents' actual values) and with the
joint-contrastive ELBOs (reparameterized samples).
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
import weakref
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import sum_rightmost
from pyro.nn import PyroModule
from pyro.params import param_with_module_name
from pyro.poutine.runtime import effectful
from torch import nn
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import IndependentTransform

from .errors import ObservationShapeError, UnsupportedModelError
from .joints import (
    data_frames,
    in_plate,
)
from .layout import ModelLayout
from .nn import MLP, DeepSet, Standardize
from .transforms import (
    ConditionalBoxSplineAutoregressive,
    ConditionalSplineAutoregressive,
    ConditionalSplineCoupling,
    OnCoordinates,
    SoftIntervalTransform,
    UnitBoxToInterval,
)

_AUTOREGRESSIVE = ("affine_autoregressive", "spline_autoregressive")
_FLOW_TRANSFORMS = (
    "affine_autoregressive",
    "spline_coupling",
    "spline_autoregressive",
    "affine_coupling",
)
_INTERVAL_TRANSFORMS = ("sigmoid", "soft", "box")
# The clamp before a flow's box layer: softer than "soft"'s default, as the box layer, not
# the clamp, shapes the density near the faces.
_BOX_SOFTNESS = 0.1


def _numel(shape):
    return reduce(operator.mul, shape, 1)


def _trimmed(shape):
    """``shape`` without its leading dims of size 1 (the padding to the plate nesting)."""
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


class AutoAmortizedGuide(PyroModule):
    """Base class of the amortized autoguides (see :class:`AutoAmortizedNormal` and
    :class:`AutoAmortizedFlow`); subclasses define :meth:`_build_posterior` and
    :meth:`_posterior`.

    Latent sites must be continuous, and either all global (outside the data plate: their
    posterior is conditioned on the whole observation, embedded by a permutation-invariant
    :class:`~pyro_jc.nn.DeepSet` when the observations are i.i.d. in a plate) or all local
    (inside the data plate: ``q(z_i | x_i)`` per datapoint).

    :param callable model: the Pyro model.
    :param observations: which argument carries each observed site's data (see
        :class:`~pyro_jc.joints.ObservationArguments`); found automatically by default.
    :param nn.Module embedding: network from standardized observations to a context vector,
        trained jointly. It receives ``(..., features)`` (all observations flattened), or
        ``(..., n, features)`` for i.i.d. observations in a data plate of size ``n``, and
        must return ``(..., context_dim)``. Default: an MLP, or a DeepSet for i.i.d. sets.
    :param int context_dim: output size of the default embedding (default: 64, or twice the
        number of latent dimensions when that is larger, so that the context is no
        bottleneck for many latents).
    :param hidden_dims: hidden widths of the default embedding (default: two layers of
        ``context_dim``).
    :param str interval_transform: how latents with an interval support (``Uniform``,
        ``Beta``, ...) reach unconstrained space: ``"sigmoid"`` (default; ``biject_to``'s
        logistic map, whose log-odds suit a normal guide for posteriors squeezed against a
        bound) or ``"soft"`` (:class:`~pyro_jc.transforms.SoftIntervalTransform`, the
        identity in the interior: the better choice for a flow over box priors, the usual
        case in simulation-based inference; it relies on the latent standardization that
        :class:`~pyro_jc.ForwardKL` fits from simulations, elsewhere call
        :meth:`standardize` with prior draws first), or ``"box"``
        (:class:`AutoAmortizedFlow` only: the soft clamp followed by a learned
        autoregressive spline of the box onto itself, for posteriors cut by the box; see
        :class:`~pyro_jc.transforms.ConditionalBoxSplineAutoregressive`). Either way
        samples never leave the support.
    """

    def __init__(
        self,
        model: Callable,
        *,
        observations: dict | Callable | None = None,
        embedding: nn.Module | None = None,
        context_dim: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        interval_transform: str = "sigmoid",
    ) -> None:
        if interval_transform not in _INTERVAL_TRANSFORMS:
            raise ValueError(
                f"interval_transform must be one of {_INTERVAL_TRANSFORMS}, got "
                f"{interval_transform!r}."
            )
        super().__init__(name=type(self).__name__)
        self.interval_transform = interval_transform
        self._model = (model,)  # a tuple keeps a model nn.Module out of this module's children
        self._observations = observations
        self._embedding_arg = embedding
        self.context_dim = context_dim  # resolved from the latent dimension at set-up
        self.hidden_dims = None if hidden_dims is None else tuple(hidden_dims)
        self.prototype_trace = None
        self._param_names = None

    # -- prototype --------------------------------------------------------------------------

    def _setup_prototype(self, *args, **kwargs):
        layout = ModelLayout(self._model[0], args, kwargs, observations=self._observations)
        trace = self.prototype_trace = layout.trace
        latents = [trace.nodes[name] for name in layout.latent_sites]
        if not latents:
            raise ValueError("The model has no latent sites: there is nothing to infer.")
        for site in latents:
            if site["fn"].support.is_discrete:
                raise UnsupportedModelError(
                    f"Latent site {site['name']!r} is discrete; {type(self).__name__} covers "
                    "continuous latents. Write the guide by hand for discrete sites (e.g. a "
                    "Categorical whose logits come from a network of x)."
                )
        self._frame = layout.data_plate
        self._nesting = layout.plate_nesting
        obs = layout.observations
        if not obs:
            raise ValueError(
                f"The model has no observed site, so {type(self).__name__} has nothing to "
                "condition on; give the data with obs=."
            )
        self._layout = layout
        layout.locations  # noqa: B018  (fails early when the data argument is ambiguous)
        observed = {name: trace.nodes[name] for name in layout.observed_sites}
        local = [s["name"] for s in latents if in_plate(s, self._frame)]
        glob = [s["name"] for s in latents if not in_plate(s, self._frame)]
        if local and glob:
            raise UnsupportedModelError(
                f"{type(self).__name__} covers models whose latents are all global or all "
                f"local to the data plate {self._frame.name!r}; this one mixes global "
                f"{glob} and local {local}. Write a guide that conditions the local sites on "
                "the global ones."
            )
        self._local = bool(local)
        per_datapoint = self._frame is not None and all(
            in_plate(s, self._frame) for s in observed.values()
        )
        if self._local and not per_datapoint:
            raise UnsupportedModelError(
                "Local latents need every observed site inside the data plate "
                f"{self._frame.name!r}, so that each datapoint has its own observation."
            )
        self._per_datapoint = per_datapoint
        # Data may leave out leading dims of size 1 (Pyro broadcasts them); the guide reads
        # them padded to the site's full shape (see _read). Data that merely broadcast
        # otherwise would give the networks another shape than the model's: refused.
        layout.check_observed_shapes(leading_dims=True)
        self._obs_layout = {
            name: (len(site["fn"].shape()), len(site["fn"].event_shape))
            for name, site in observed.items()
        }
        self._obs_shapes = {name: tuple(site["fn"].shape()) for name, site in observed.items()}
        self._latent_layout = [self._site_layout(s) for s in latents]
        self.latent_dim = sum(layout["size"] for layout in self._latent_layout)
        # Coordinates of the joined vector that live in the unit box ("box" intervals).
        box, offset = [], 0
        for layout in self._latent_layout:
            t = layout["transform"]
            if isinstance(getattr(t, "base_transform", t), UnitBoxToInterval):
                box.extend(range(offset, offset + layout["size"]))
            offset += layout["size"]
        self.register_buffer("box_index", torch.tensor(box, dtype=torch.long) if box else None)

        # The networks produce the model's latents: they take the latents' device and dtype
        # (float64 data for a float32 model enter as float32).
        ref = latents[0]["value"]
        self._feature_kind = {"device": ref.device, "dtype": ref.dtype}
        x = self._features(self._read(args, kwargs))
        device, dtype = ref.device, ref.dtype
        self.obs_standardize = Standardize(
            x.shape[-1], what=f"the observations of {sorted(observed)} (guide inputs)"
        ).to(device=device, dtype=dtype)
        self.latent_standardize = Standardize(self.latent_dim, what="the unconstrained latents").to(
            device=device, dtype=dtype
        )
        if self.context_dim is None:
            self.context_dim = max(64, 2 * self.latent_dim)
        if self.hidden_dims is None:
            self.hidden_dims = (self.context_dim, self.context_dim)
        self.embedding = self._build_embedding(x.shape[-1]).to(device=device, dtype=dtype)
        with torch.no_grad():
            context_dim = self.embedding(x).shape[-1]
        self._build_posterior(context_dim)
        self.to(device=device, dtype=dtype)

    def _site_layout(self, site):
        event_shape = site["fn"].event_shape
        batch_shape = site["value"].shape[: site["value"].dim() - len(event_shape)]
        batch_shape = (1,) * (self._nesting - len(batch_shape)) + tuple(batch_shape)
        transform = self._unconstraining(site["fn"].support)
        unconstrained = tuple(transform.inv.forward_shape(event_shape))
        frames = [f for f in data_frames(site) if f != self._frame]
        if self._local:
            for f in frames:
                raise UnsupportedModelError(
                    f"Local site {site['name']!r} is in plate {f.name!r} nested in the data "
                    "plate; amortized autoguides support one data plate per local site."
                )
        for f in frames:
            if f.full_size is not None and f.full_size != f.size:
                raise UnsupportedModelError(
                    f"Global site {site['name']!r} is in the subsampled plate {f.name!r}; "
                    "amortized autoguides subsample only the data plate."
                )
        per_unit = _numel(unconstrained)
        size = per_unit if self._local else per_unit * _numel(batch_shape)
        return {
            "name": site["name"],
            "batch_shape": torch.Size(batch_shape),
            "event_shape": torch.Size(event_shape),
            "unconstrained_shape": torch.Size(unconstrained),
            "transform": transform,
            "support": site["fn"].support,
            "frames": frames,
            "size": size,
        }

    def _unconstraining(self, support):
        """The bijection from unconstrained space onto ``support``."""
        if self.interval_transform in ("soft", "box"):
            base, ndims = support, 0
            if isinstance(base, constraints.independent):
                base, ndims = base.base_constraint, base.reinterpreted_batch_ndims
            if isinstance(base, (constraints.interval, constraints.half_open_interval)):
                low, high = base.lower_bound, base.upper_bound
                # "box": the joined vector holds the unit-box coordinate; the flow clamps.
                to_support = (
                    SoftIntervalTransform(low, high)
                    if self.interval_transform == "soft"
                    else UnitBoxToInterval(low, high)
                )
                return IndependentTransform(to_support, ndims) if ndims else to_support
        return biject_to(support)

    def _box_clamp(self):
        """The clamp of the joined vector's box coordinates into the unit box."""
        clamp = SoftIntervalTransform(-1.0, 1.0, _BOX_SOFTNESS, cache_size=1)
        return IndependentTransform(clamp, 1, cache_size=1)

    def _build_embedding(self, in_dim):
        if self._embedding_arg is not None:
            return self._embedding_arg
        if self._per_datapoint and not self._local:
            return DeepSet(in_dim, self.hidden_dims, self.context_dim)
        return MLP(in_dim, self.hidden_dims, self.context_dim)

    # -- observations -----------------------------------------------------------------------

    def _read(self, args, kwargs):
        """The observations in ``args``/``kwargs``, padded to their sites' dims and checked
        against the shapes the guide was set up for: the same up to leading dims (a batch of
        observations, shared by all sites) and the size of the data plate (another data set,
        or the full data of a subsampled plate)."""
        observations = self._layout.read(args, kwargs)
        prefixes = {}
        for name, x in observations.items():
            ndim, event_dim = self._obs_layout[name]
            if x.dim() < ndim:
                x = observations[name] = x.reshape((1,) * (ndim - x.dim()) + x.shape)
            expected = self._obs_shapes[name]
            got = tuple(x.shape[x.dim() - ndim :])
            free = ndim + self._frame.dim - event_dim if self._per_datapoint else None
            if any(g != e for i, (g, e) in enumerate(zip(got, expected, strict=True)) if i != free):
                plate = (
                    f" (any size along dim {free - ndim}, the data plate {self._frame.name!r})"
                    if free is not None
                    else ""
                )
                raise ObservationShapeError(
                    f"Observed site {name!r}: {type(self).__name__} was set up for data shaped "
                    f"{expected}{plate}, optionally with leading dims for a batch of "
                    f"observations, but got shape {tuple(x.shape)}. Pass data shaped as the "
                    "model's site (as when the guide was set up)."
                )
            prefixes[name] = tuple(x.shape[: x.dim() - ndim])
        if len(set(prefixes.values())) > 1:
            raise ObservationShapeError(
                "The observed sites carry different leading (batch) dims: "
                f"{prefixes}; a batch of observations needs the same leading dims on every site."
            )
        return observations

    def observations(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``{observed site: value}``: the observations the guide reads from the model's
        arguments ``args``/``kwargs`` (checked against the shapes it was set up for)."""
        self._check_set_up("observations")
        return self._read(args, kwargs)

    @torch.no_grad()
    def embed(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The guide's summary of the observations in ``args``/``kwargs`` (which may carry
        extra leading dims): the embedding network's output on the standardized observations,
        the features of every datapoint joined, ``(*leading, features)``. What
        :func:`~pyro_jc.diagnostics.misspecification_test` compares."""
        self._check_set_up("embed")
        context = self._context(args, kwargs)
        prefix = self._prefix(self._read(args, kwargs))
        return context.reshape(prefix + (-1,))

    def _prefix(self, observations):
        name, x = next(iter(observations.items()))
        ndim = self._obs_layout[name][0]
        if x.dim() < ndim:
            raise ValueError(
                f"Observation {name!r} has shape {tuple(x.shape)}, fewer dims than the "
                f"prototype's ({ndim})."
            )
        return x.shape[: x.dim() - ndim]

    def _features(self, observations, index=None):
        """Flatten observations to ``(*prefix, features)``, or ``(*prefix, n, features)``
        per datapoint (``index`` subsamples the data plate)."""
        prefix = self._prefix(observations)
        feats = []
        for name, x in observations.items():
            _, event_dim = self._obs_layout[name]
            if not self._per_datapoint:
                feats.append(x.reshape(prefix + (-1,)))
                continue
            data_dim = x.dim() + self._frame.dim - event_dim
            x = x.movedim(data_dim, len(prefix))
            if index is not None and x.shape[len(prefix)] != len(index):
                x = x.index_select(len(prefix), index)
            feats.append(x.reshape(x.shape[: len(prefix) + 1] + (-1,)))
        x = torch.cat(feats, -1)
        # Counts and categories (integer data) enter the networks as floats, any data in
        # the networks' dtype and on their device.
        standardize = self._modules.get("obs_standardize")
        if standardize is not None:  # set up: follow the module (guide.to(...) moves it)
            return x.to(device=standardize.mean.device, dtype=standardize.mean.dtype)
        return x.to(**self._feature_kind)

    def standardize(self, observations: dict | None = None, latents: dict | None = None) -> None:
        """Fit the standardization of observations and/or latents from samples, e.g. the
        simulations of a bank (called by :class:`~pyro_jc.ForwardKL`).

        :param dict observations: ``{observed site: values}`` with leading sample dims.
        :param dict latents: ``{latent site: values}`` in the model's layout with leading
            sample dims.
        """
        if observations is not None:
            x = self._features(observations)
            self.obs_standardize.fit(x)
        if latents is not None:
            u = self._unconstrained_vector(latents)
            if self.box_index is not None:  # standardize where the flow is: before the clamp
                box = self._box_clamp().inv(u.index_select(-1, self.box_index))
                u = u.index_copy(-1, self.box_index, box)
            self.latent_standardize.fit(u)

    @property
    def is_standardized(self) -> bool:
        return self.prototype_trace is not None and self.latent_standardize.is_fitted

    # -- latents ----------------------------------------------------------------------------

    def _unconstrained_vector(self, values):
        """Join the unconstrained latents into ``(*left, *aux_batch, latent_dim)``."""
        parts = []
        for layout in self._latent_layout:
            z = values[layout["name"]]
            u = layout["transform"].inv(z)
            n_event = len(layout["unconstrained_shape"])
            batch = u.shape[: u.dim() - n_event]
            if self._local:
                parts.append(u.reshape(batch + (-1,)))
            else:
                left = batch[: len(batch) - self._nesting]
                parts.append(u.reshape(left + (1,) * self._nesting + (-1,)))
        shape = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
        return torch.cat([p.expand(shape + p.shape[-1:]) for p in parts], -1)

    def _split(self, u):
        """Split ``u`` into each site's unconstrained value in the model's layout."""
        left = u.shape[: u.dim() - 1 - self._nesting]
        aux_batch = u.shape[u.dim() - 1 - self._nesting : -1]
        out, offset = [], 0
        for layout in self._latent_layout:
            piece = u[..., offset : offset + layout["size"]]
            offset += layout["size"]
            batch = aux_batch if self._local else layout["batch_shape"]
            out.append(piece.reshape(left + batch + layout["unconstrained_shape"]))
        return out

    def _log_jacobian(self, layout, u, z, aux_ndim):
        t = layout["transform"]
        ldj = sum_rightmost(
            t.log_abs_det_jacobian(u, z), len(layout["event_shape"]) - t.codomain.event_dim
        )
        # Plate dims of a global site are part of the joined vector: sum them.
        dims = [d for d in range(-self._nesting, 0) if ldj.dim() >= -d and ldj.shape[d] > 1]
        if not self._local and dims:
            ldj = ldj.sum(dims, keepdim=True)
        return (
            ldj if ldj.dim() >= aux_ndim else ldj.reshape((1,) * (aux_ndim - ldj.dim()) + ldj.shape)
        )

    # -- forward ----------------------------------------------------------------------------

    def _context(self, args, kwargs, index=None):
        observations = self._read(args, kwargs)
        x = self._features(observations, index)
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if not self.obs_standardize.is_fitted and rows > 1 and not self._querying:
            # From the data themselves (ELBO training; never from a query's observations):
            # a few datapoints may well agree.
            self.obs_standardize.fit(x, warn_constant=False)
        x = self.obs_standardize(x)
        if self._querying and self.obs_standardize.is_fitted:
            self._check_extrapolation(x)
        context = self.embedding(x)
        prefix = self._prefix(observations)
        if self._local:
            n = context.shape[len(prefix)]
            aux_batch = [1] * self._nesting
            aux_batch[self._frame.dim] = n
            return context.reshape(prefix + tuple(aux_batch) + context.shape[-1:])
        return context.reshape(prefix + (1,) * self._nesting + context.shape[-1:])

    def __getattr__(self, name):
        # PyroModule states every parameter of an nn.Module child (walking its submodules)
        # on each attribute read; forward states them all once instead (_register_params).
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules and not isinstance(modules[name], PyroModule):
            return modules[name]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            self.__dict__["_param_names"] = None  # a new child: list the parameters again

    def _register_params(self):
        """Keep the guide's state in Pyro's param store, as Pyro's autoguides do.

        Every trainable parameter gets a ``pyro.param`` statement under the name
        ``pyro.module`` would give it, so that SVI captures it; where the store already
        holds a value of that name (loaded with ``pyro.get_param_store().load``, or trained
        by an earlier guide of the same name) the store's tensor replaces the module's, so
        the guide computes with what SVI optimizes. The child modules' buffers (the
        standardization statistics, the autoregressive layers' masks and orders) are kept
        in the store as constants (no ``pyro.param`` statement, so SVI never steps them),
        so that the store's ``save``/``load`` carries them too; they are compared with the
        store only when a parameter was adopted or the store lost them (cleared), so a step
        pays for no lookup. With Pyro's ``module_local_params`` setting the guide states
        the parameters (as PyroModule does, without a store) and the module's
        ``state_dict`` holds everything."""
        if self._param_names is None:
            prefix = self._pyro_name + "." if self._pyro_name else ""
            params, buffers = [], []
            for child, module in self.named_children():
                if isinstance(module, PyroModule):
                    continue
                for name, p in module.named_parameters():
                    if p.requires_grad:
                        params.append((param_with_module_name(prefix + child, name), p))
                for name, b in module.named_buffers():
                    if b is not None:
                        owner, _, attr = (child + "." + name).rpartition(".")
                        stored_name = param_with_module_name(prefix + child, name)
                        owner = self.get_submodule(owner)
                        buffers.append(_StoredBuffer(stored_name, owner, attr))
            self.__dict__["_param_names"] = (params, buffers)
        params, buffers = self._param_names
        if pyro.settings.get("module_local_params"):
            for name, p in params:
                _state_local_param(name, p)
            return
        adopted = False
        for i, (name, p) in enumerate(params):
            stored = pyro.param(name, p)
            if stored is not p:
                params[i] = (name, self._adopt(name, p, stored))
                adopted = True
        if buffers:
            store = pyro.get_param_store()
            full = adopted or buffers[0].name not in store
            for entry in buffers:
                entry.sync(store, full)

    def __getstate__(self):
        # PyroModule's drops Pyro's weak links from the parameters; the cache of statements
        # links to this process's param store and is rebuilt at the next call.
        state = super().__getstate__()
        for buffer in self.buffers():
            buffer.__dict__.pop("unconstrained", None)
        state["_param_names"] = None
        return state

    def _adopt(self, name, current, stored):
        """Put the store's tensor ``stored`` in place of the module's parameter ``current``."""
        stored = stored.unconstrained() if hasattr(stored, "unconstrained") else stored
        if stored.shape != current.shape:
            raise ValueError(
                f"Pyro's param store holds {name!r} with shape {tuple(stored.shape)}, but this "
                f"{type(self).__name__} has it with shape {tuple(current.shape)}: the store "
                "was saved from (or trained by) a guide of the same name for another model or "
                "configuration. Call pyro.clear_param_store(), or keep each guide's parameters "
                "in its own pyro.get_param_store().scope()."
            )
        for module in self.modules():
            for key, p in module._parameters.items():
                if p is current:
                    module._parameters[key] = stored
        return stored

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._register_params()
        if self._local:
            frame = self._frame
            subsampled = frame.full_size not in (None, frame.size)
            size = frame.full_size if subsampled else self._num_datapoints(args, kwargs)
            with pyro.plate(
                frame.name,
                size,
                subsample_size=frame.size if subsampled else None,
                dim=frame.dim,
            ) as index:
                index = index if subsampled else None
                return self._sample_sites(self._context(args, kwargs, index))
        return self._sample_sites(self._context(args, kwargs))

    def _num_datapoints(self, args, kwargs):
        name, x = next(iter(self._read(args, kwargs).items()))
        return x.shape[x.dim() + self._frame.dim - self._obs_layout[name][1]]

    def _sample_sites(self, context):
        q_u = self._posterior(context)
        left = context.shape[: context.dim() - 1 - self._nesting]
        aux_batch = context.shape[context.dim() - 1 - self._nesting : -1]
        draw, values = {}, {}

        def propose(site_batch_shape):
            # Drawn on the first latent site that is not replayed, so a guide whose latents
            # are all replayed (ForwardKL) never pays for a sample it would discard. Plates
            # outside the guide (e.g. sample_posterior's) enlarge the site's batch shape.
            if not draw:
                n = len(site_batch_shape) - self._nesting
                shape = torch.broadcast_shapes(
                    q_u.batch_shape, site_batch_shape[:n] + (1,) * self._nesting
                )
                q = q_u if shape == q_u.batch_shape else q_u.expand(shape)
                draw["u"] = q.rsample()
                draw["z"] = {
                    layout["name"]: layout["transform"](piece)
                    for layout, piece in zip(
                        self._latent_layout, self._split(draw["u"]), strict=True
                    )
                }
                if self._querying:  # posterior draws for the user: no sync in training
                    self._check_draws(draw["z"])
            return draw["z"]

        def log_density():
            # log q(z | x) at the values the sites actually took (replayed ones included).
            ours = draw and all(values[k] is draw["z"][k] for k in values)
            return self._log_density(q_u, values, draw["u"] if ours else None)

        def score(name, value):
            # log q at a value the site did not take (e.g. the information estimate's
            # pairs z_i, x_j): exact for one latent site; a joint over several sites cannot
            # score one site's value alone.
            if len(self._latent_layout) > 1:
                raise NotImplementedError(
                    f"{type(self).__name__} was asked for the density of site {name!r} at a "
                    "value it did not take, but its density is joint over the sites "
                    f"{[layout['name'] for layout in self._latent_layout]}. Score all sites "
                    "together with guide.log_prob(latents, *args) (or pass "
                    "estimate_information=False to the ELBO)."
                )
            return self._log_density(q_u, {name: value})

        density_site = self._density_site()
        for layout in self._latent_layout:
            name = layout["name"]
            batch = aux_batch if self._local else layout["batch_shape"]
            # Without leading dims the site takes the model's batch shape (its padding to
            # the plate nesting dropped), as an unbatched run of the model has it.
            batch = left + batch if left else _trimmed(batch)
            fn = _Carried(
                lambda batch_shape, name=name: propose(batch_shape)[name],
                batch + layout["event_shape"],
                len(layout["event_shape"]),
                layout["support"],
                log_density if name == density_site else None,
                lambda value, name=name: values.get(name) is value,
                lambda value, name=name: score(name, value),
            )
            with _plates(layout["frames"]):
                values[name] = pyro.sample(name, fn)
        return values

    _querying = False  # inside sample_posterior / median / quantiles

    @contextlib.contextmanager
    def _query(self):
        """Mark a posterior query by the user (not a draw inside training), whose
        observations are checked against the training range."""
        outer, self._querying = self._querying, True
        try:
            yield
        finally:
            self._querying = outer

    #: Standardized observations beyond this many standard deviations from the mean of the
    #: training observations get a warning when the guide is sampled.
    EXTRAPOLATION_SDS = 20.0

    def _check_extrapolation(self, x):
        self._obs_extent = float(x.abs().amax()) if x.numel() else 0.0
        if self._obs_extent > self.EXTRAPOLATION_SDS and not getattr(self, "_extrapolated", 0):
            self._extrapolated = True  # once per guide: loops over observations stay readable
            warnings.warn(
                f"{type(self).__name__}: the observations reach {self._obs_extent:.3g} standard "
                "deviations from the mean of those the guide was trained on (simulations or "
                f"data), beyond {self.EXTRAPOLATION_SDS:g}: the guide is extrapolating, and "
                "its posterior there is not to be trusted. Check the observations (units, "
                "preprocessing) or train on simulations that cover them.",
                UserWarning,
                stacklevel=3,
            )

    def _check_draws(self, values):
        """Warn about draws that left their site's support numerically (``inf``, or ``0.0``
        for a positive site): the unconstrained draw overflowed its transform, which happens
        for observations far outside those the guide was trained on."""
        for layout in self._latent_layout:
            z = values[layout["name"]]
            broken = ~torch.isfinite(layout["transform"].inv(z))
            if not bool(broken.any()):
                continue
            extent = getattr(self, "_obs_extent", None)
            where = (
                f" The observations reach {extent:.3g} standard deviations from the mean of "
                "those the guide was trained on."
                if extent is not None
                else ""
            )
            warnings.warn(
                f"{type(self).__name__}: {float(broken.float().mean()):.1%} of the draws of site "
                f"{layout['name']!r} overflowed its support ({layout['support']}): they came out "
                f"as inf or on the boundary.{where} The guide is extrapolating far outside its "
                "training range: check the observations (units, preprocessing), or train on "
                "simulations that cover them.",
                UserWarning,
                stacklevel=2,
            )

    def _log_density(self, q_u, values, u=None):
        """``log q(z | x)`` of the latents ``values`` (``{site: value}``, leading dims
        broadcast against ``q_u``'s batch), shape ``(*left, *aux_batch)``; ``u``: their joined
        unconstrained vector when known (a flow's own draw keeps its cache)."""
        u = self._unconstrained_vector(values) if u is None else u
        log_q = q_u.log_prob(u)
        for layout, piece in zip(self._latent_layout, self._split(u), strict=True):
            z = values[layout["name"]]
            log_q = log_q - self._log_jacobian(layout, piece, z, u.dim() - 1)
        return log_q

    def _density_site(self):
        for layout in self._latent_layout:
            if self._local or _numel(layout["batch_shape"]) == 1:
                return layout["name"]
        return self._latent_layout[0]["name"]

    # -- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample_posterior(
        self, *args: Any, num_samples: int = 1000, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Draw ``num_samples`` posterior samples for the observations in ``args``, which may
        hold many observations at once along extra leading dims (the guide must have been
        set up by a call with the model's own arguments, e.g. by training).

        :returns: ``{site: tensor}`` of shape ``(num_samples, *leading, *site_shape)``.
        """
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__} is set up from its first call, which must take the "
                "model's own arguments (one observation): train it, or call guide(*args) once, "
                "before sampling for a batch of observations."
            )
        return self._draw(args, kwargs, num_samples)[0]

    @torch.no_grad()
    def sample_and_log_prob(
        self, *args: Any, num_samples: int = 1000, **kwargs: Any
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Posterior draws as :meth:`sample_posterior` gives them, with their density
        ``log q(z | x)`` as :meth:`log_prob` gives it: for a flow, at the cost of the draws
        alone (the layers remember the log-determinants of the pass that drew them, where
        :meth:`log_prob` on the draws would evaluate the flow once more).

        :returns: ``(draws, log_q)``: ``{site: tensor}`` of shape
            ``(num_samples, *leading, *site_shape)``, and ``log_q`` of shape
            ``(num_samples, *leading)``.
        """
        self._check_set_up("sample_and_log_prob")
        draws, trace = self._draw(args, kwargs, num_samples)
        site = trace.nodes[self._density_site()]
        log_q = site["fn"].log_prob(site["value"])
        # The density site spreads the joint over the plates it sits in (see _Carried).
        return draws, log_q.sum(tuple(range(-self._nesting, 0))) if self._nesting else log_q

    def _draw(self, args, kwargs, num_samples):
        prefix = self._prefix(self._read(args, kwargs))
        dim = -self._nesting - 1 - len(prefix)
        with self._query(), pyro.plate("_num_posterior_samples", num_samples, dim=dim):
            trace = poutine.trace(self).get_trace(*args, **kwargs)
        draws = {
            layout["name"]: trace.nodes[layout["name"]]["value"] for layout in self._latent_layout
        }
        return draws, trace

    def _check_set_up(self, method):
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__}.{method} needs the guide set up: its first call must "
                "take the model's own arguments (one observation). Train it, or call "
                "guide(*args) once (after pyro.get_param_store().load(...) too)."
            )

    def reset_parameters(self) -> None:
        """Draw fresh initial weights for the embedding and the posterior's networks, as at
        set-up, keeping the prototype and the standardization: training then starts from
        scratch on the same inputs (``retrain`` of
        :func:`~pyro_jc.sequential.fit_sequential`). The weights change in place, so Pyro's
        param store and an optimizer's state keep referring to them.

        Each network is reset by its own ``reset_parameters`` (which covers its submodules,
        as torch's layers and :mod:`pyro_jc.transforms`' zero-output spline layers do), or
        else by its submodules'.

        :raises RuntimeError: the guide is not set up yet.
        :raises TypeError: a network of the user's holds parameters of its own but has no
            ``reset_parameters``.
        """
        self._check_set_up("reset_parameters")
        # Every network is checked before any is reset: an error leaves the weights as they were.
        named = {}  # one name per network, the public one where it has two (embedding=)
        for name, child in self._modules.items():
            if child is not None and named.get(id(child), ("_",))[0].startswith("_"):
                named[id(child)] = (name, child)
        resets = [m for name, child in named.values() for m in _resettable(child, name)]
        with torch.no_grad():
            for module in resets:
                module.reset_parameters()

    def log_prob(self, latents: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``log q(z | x)`` of the latents at the observations in ``args``/``kwargs``: the
        amortized-posterior contract that :class:`~pyro_jc.ForwardKL`, the ELBOs'
        information estimate and :func:`~pyro_jc.diagnostics.sbc` rely on.

        :param dict latents: ``{site: value}`` for every latent site, shaped like the model's
            site with extra leading dims (a batch of latents).
        :param args: the model's arguments; the observations may carry extra leading dims (a
            batch of observations), which broadcast against the latents' leading dims.
        :returns: a tensor of shape ``broadcast(latents' leading dims, observations' leading
            dims)``; for local latents the datapoints' densities are summed.
        :rtype: torch.Tensor
        """
        self._check_set_up("log_prob")
        missing = [
            layout["name"] for layout in self._latent_layout if layout["name"] not in latents
        ]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.log_prob needs a value for every latent site; "
                f"missing {missing}."
            )
        self._register_params()
        with self._query():  # the observations asked about never fit the standardization
            context = self._context(args, kwargs)
        values = {layout["name"]: latents[layout["name"]] for layout in self._latent_layout}
        log_q = self._log_density(self._posterior(context), values)
        return log_q.sum(tuple(range(-self._nesting, 0))) if self._nesting else log_q

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The posterior median of each latent site at the observations in ``args`` (which
        may carry extra leading dims): the median of ``q(u | x)`` pushed to each site's
        support, as Pyro's ``AutoNormal.median`` (exact for coordinate-wise supports; for
        a flow, the median of the base distribution pushed through the flow, the
        coordinate-wise median of the unconstrained posterior only for monotone layers).

        :returns: ``{site: tensor}`` shaped like the site with the observations' leading dims.
        """
        self._check_set_up("median")
        with self._query():
            return self._from_unconstrained(self._median_unconstrained(args, kwargs))

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float], *args: Any, num_samples: int = 10000, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Marginal posterior quantiles of each latent site, in its support, at the
        observations in ``args`` (which may carry extra leading dims).

        :param quantiles: a list of levels in ``(0, 1)``.
        :param int num_samples: posterior draws for the empirical quantiles of guides
            without a closed form (flows); :class:`AutoAmortizedNormal` is exact for
            coordinate-wise supports.
        :returns: ``{site: tensor}`` with a leading dim over ``quantiles``.
        """
        self._check_set_up("quantiles")
        levels = torch.as_tensor(quantiles, dtype=torch.get_default_dtype())
        if levels.dim() != 1 or not bool(((levels > 0) & (levels < 1)).all()):
            raise ValueError(f"quantiles must be a list of levels in (0, 1); got {quantiles}.")
        with self._query():
            exact = self._quantiles_unconstrained(levels, args, kwargs)
        if exact is not None:
            return self._from_unconstrained(exact)
        draws = self.sample_posterior(*args, num_samples=num_samples, **kwargs)
        return {
            layout["name"]: torch.quantile(
                self._site_shaped(layout, draws[layout["name"]]),
                levels.to(draws[layout["name"]]),
                dim=0,
            )
            for layout in self._latent_layout
        }

    def map(
        self,
        *args: Any,
        num_samples: int = 1000,
        num_steps: int = 200,
        learning_rate: float = 0.01,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """The posterior mode (maximum a posteriori under the guide) of the latents at the
        observations in ``args`` (which may carry extra leading dims): the draw of highest
        ``log q(z | x)`` among ``num_samples``, then ``num_steps`` of Adam on ``log q(z | x)``
        with the rate annealed by a cosine (the density of the latents in their own support,
        Jacobians included, so the mode of a positive site is that of its density there, not
        of its logarithm's). Like sbi's ``map``, it finds the mode of the guide's density,
        which a multimodal posterior may hold in a draw's basin other than the highest one.

        :param int num_samples: draws to start from the best of.
        :param int num_steps: gradient-ascent steps (0: the best draw).
        :param float learning_rate: Adam's step size in the unconstrained space.
        :returns: ``{site: tensor}`` shaped like the site with the observations' leading dims.
        """
        self._check_set_up("map")
        if num_samples < 1 or num_steps < 0:
            raise ValueError(
                f"map needs num_samples >= 1 and num_steps >= 0; got {num_samples}, {num_steps}."
            )
        with self._query(), torch.no_grad():
            q_u = self._posterior(self._context(args, kwargs))
            draws = q_u.sample((num_samples,))
            score = self._log_density_u(q_u, draws)
            best = score.argmax(0, keepdim=True).unsqueeze(-1).expand((1,) + draws.shape[1:])
            u = draws.gather(0, best).squeeze(0)
        u = u.detach().requires_grad_()
        adam = torch.optim.Adam([u], lr=learning_rate)
        # Annealed to zero: Adam's steps do not shrink near the mode by themselves.
        anneal = torch.optim.lr_scheduler.CosineAnnealingLR(adam, max(num_steps, 1))
        with torch.enable_grad():
            for _ in range(num_steps):
                # A new tensor each step: the flows' transforms cache by identity. The
                # gradient is taken for u alone: the guide's own parameters (which a flow's
                # layers use at each call) keep their .grad as training left it.
                loss = -self._log_density_u(q_u, u + 0).sum()
                (u.grad,) = torch.autograd.grad(loss, [u])
                adam.step()
                anneal.step()
        return self._from_unconstrained(u.detach())

    def _log_density_u(self, q_u, u):
        """``log q(z | x)`` at the latents whose joined unconstrained vector is ``u``."""
        values = {
            layout["name"]: layout["transform"](piece)
            for layout, piece in zip(self._latent_layout, self._split(u), strict=True)
        }
        return self._log_density(q_u, values, u)

    def _from_unconstrained(self, u):
        """``{site: value}`` from joined unconstrained vectors ``(*left, *aux, latent_dim)``,
        the nesting dims of global sites dropped."""
        return {
            layout["name"]: self._site_shaped(layout, layout["transform"](piece))
            for layout, piece in zip(self._latent_layout, self._split(u), strict=True)
        }

    def _site_shaped(self, layout, z):
        """A global site's value without the padding of its batch shape to the plate
        nesting: ``(*leading, *site_shape)`` as the model's site has it."""
        if self._local:
            return z
        return z.reshape(
            z.shape[: z.dim() - len(layout["event_shape"]) - self._nesting]
            + _trimmed(layout["batch_shape"])
            + layout["event_shape"]
        )

    def _median_unconstrained(self, args, kwargs):
        q_u = self._posterior(self._context(args, kwargs))
        if isinstance(q_u, _StandardizedFlow):
            flow = q_u.flow
            if not (hasattr(flow, "base") and hasattr(flow, "transform")):
                raise NotImplementedError(
                    "median needs a flow with a base distribution and a transform (as zuko's "
                    "NormalizingFlow); use quantiles([0.5], ...) for the empirical median."
                )
            return q_u.loc + q_u.scale * flow.transform.inv(flow.base.mean)
        base = q_u.base_dist if isinstance(q_u, dist.TransformedDistribution) else None
        if base is None:
            return q_u.mean
        u = base.mean
        for t in q_u.transforms:
            u = t(u)
        return u

    def _quantiles_unconstrained(self, levels, args, kwargs):
        return None

    def _build_posterior(self, context_dim):
        raise NotImplementedError

    def _posterior(self, context):
        raise NotImplementedError


class AutoAmortizedNormal(AutoAmortizedGuide):
    """Amortized diagonal normal guide: ``u | x ~ Normal(loc(x), scale(x))`` over the joined
    unconstrained latents, mapped to each site's support by
    :func:`~torch.distributions.biject_to`.

    Takes the arguments of :class:`AutoAmortizedGuide`, plus:

    :param float init_scale: initial posterior scale (in standardized units).
    """

    def __init__(self, model: Callable, *, init_scale: float = 1.0, **kwargs: Any) -> None:
        if kwargs.get("interval_transform") == "box":
            raise ValueError(
                "interval_transform='box' ends a flow with a spline of the box: use "
                "AutoAmortizedFlow, or 'soft' / 'sigmoid' with AutoAmortizedNormal."
            )
        super().__init__(model, **kwargs)
        self.init_scale = init_scale

    def _build_posterior(self, context_dim):
        self.head = nn.Linear(context_dim, 2 * self.latent_dim)
        self._initialize_head()

    def _initialize_head(self):
        """Start at the same posterior for every observation, with ``scale = init_scale``
        (the ``loc`` is the layer's small initial bias)."""
        with torch.no_grad():
            nn.init.zeros_(self.head.weight)
            self.head.bias[self.latent_dim :] = math.log(math.expm1(self.init_scale))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._initialize_head()

    def _quantiles_unconstrained(self, levels, args, kwargs):
        q_u = self._posterior(self._context(args, kwargs)).base_dist
        levels = levels.to(q_u.loc).reshape((-1,) + (1,) * q_u.loc.dim())
        return q_u.icdf(levels)

    def _posterior(self, context):
        loc, raw = self.head(context).chunk(2, -1)
        mean, std = self.latent_standardize.mean, self.latent_standardize.std
        scale = nn.functional.softplus(raw) + 1e-6
        return dist.Normal(mean + std * loc, std * scale).to_event(1)


class AutoAmortizedFlow(AutoAmortizedGuide):
    """Amortized normalizing-flow guide: ``u | x`` is a standard normal pushed through
    ``num_transforms`` conditional transforms of Pyro (conditioned on the embedding of
    ``x``, with a permutation between layers), then through the latent standardization.

    Takes the arguments of :class:`AutoAmortizedGuide`, plus:

    :param str transform: ``"affine_autoregressive"`` (default; MAF, Pyro's layer),
        ``"spline_autoregressive"`` (rational-quadratic neural spline flow, autoregressive;
        :class:`~pyro_jc.transforms.ConditionalSplineAutoregressive`), ``"spline_coupling"``
        (its coupling form; :class:`~pyro_jc.transforms.ConditionalSplineCoupling`) or
        ``"affine_coupling"`` (RealNVP, Pyro's layer). With one latent dimension every kind
        uses a rational-quadratic spline conditioned on the observations. (Pyro's own
        conditional spline layers are linear-order rational splines, and its quadratic
        option fails in Pyro 1.9, hence pyro_jc's.)
    :param int num_transforms: number of flow layers.
    :param flow_hidden_dims: hidden widths of each layer's conditioner network (default: two
        layers of 50, or of twice the number of latent dimensions when that is larger:
        autoregressive layers need at least as many hidden units as dimensions).
    :param str fast: ``"log_prob"`` (default) puts autoregressive layers in the direction
        that evaluates the density in one pass (what :class:`~pyro_jc.ForwardKL` needs);
        ``"sample"`` makes sampling one pass instead (better for reparameterized ELBO
        training). Coupling layers are one pass both ways.
    :param int count_bins: spline bins.
    :param float bound: spline interval half-width (standardized units).
    :param callable flow: a builder ``flow(features, context) -> nn.Module`` whose module,
        called with the context ``(..., context)``, returns a conditional distribution over
        ``(..., features)`` (``rsample`` and ``log_prob``), in place of the layers above:
        any flow of zuko (``flow=lambda f, c: zuko.flows.NSF(f, c, transforms=5)``), or Pyro
        conditional transforms wrapped in a module returning
        ``ConditionalTransformedDistribution(...).condition(context)``. It models the
        standardized unconstrained latents; the latent standardization and the support
        maps are applied around it as for the built-in layers (not with
        ``interval_transform="box"``).

    With ``interval_transform="box"`` the flow ends, on the interval coordinates, with the
    clamp into the unit box and a box spline layer of the same width and bins.

    >>> import torch, zuko, pyro, pyro.distributions as dist
    >>> from pyro_jc import AutoAmortizedFlow
    >>> def model(x):
    ...     z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    ...     pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
    >>> guide = AutoAmortizedFlow(model, flow=lambda f, c: zuko.flows.NSF(f, c, transforms=2))
    >>> guide(torch.zeros(2))["z"].shape
    torch.Size([2])
    """

    def __init__(
        self,
        model: Callable,
        *,
        transform: str = "affine_autoregressive",
        num_transforms: int = 5,
        flow_hidden_dims: Sequence[int] | None = None,
        fast: str = "log_prob",
        count_bins: int = 8,
        bound: float = 5.0,
        flow: Callable[[int, int], nn.Module] | None = None,
        **kwargs: Any,
    ) -> None:
        if flow is not None and not callable(flow):
            raise TypeError(
                "flow must be a builder flow(features, context) -> nn.Module, e.g. "
                f"lambda f, c: zuko.flows.NSF(f, c); got {type(flow).__name__}."
            )
        if flow is not None and kwargs.get("interval_transform") == "box":
            raise ValueError(
                "interval_transform='box' ends the built-in flow with a box spline layer; with "
                "flow= use 'soft' or 'sigmoid'."
            )
        if transform not in _FLOW_TRANSFORMS:
            raise ValueError(f"transform must be one of {_FLOW_TRANSFORMS}, got {transform!r}.")
        if fast not in ("log_prob", "sample"):
            raise ValueError(f"fast must be 'log_prob' or 'sample', got {fast!r}.")
        super().__init__(model, **kwargs)
        self.transform = transform
        self.num_transforms = num_transforms
        # Resolved from the latent dimension at set-up when not given.
        self.flow_hidden_dims = None if flow_hidden_dims is None else list(flow_hidden_dims)
        self.fast = fast
        self.count_bins = count_bins
        self.bound = bound
        self._flow_builder = flow

    def _build_posterior(self, context_dim):
        if self._flow_builder is not None:
            self.flow = self._flow_builder(self.latent_dim, context_dim)
            if not isinstance(self.flow, nn.Module):
                raise TypeError(
                    "flow(features, context) must return an nn.Module (its parameters are "
                    f"trained), got {type(self.flow).__name__}."
                )
            return
        T = dist.transforms
        d = self.latent_dim
        if self.flow_hidden_dims is None:
            self.flow_hidden_dims = [max(50, 2 * d)] * 2
        layers = []
        for _ in range(self.num_transforms):
            if d == 1 or self.transform == "spline_coupling":
                layer = ConditionalSplineCoupling(
                    d,
                    context_dim,
                    self.flow_hidden_dims,
                    count_bins=self.count_bins,
                    bound=self.bound,
                )
            elif self.transform == "affine_autoregressive":
                layer = T.conditional_affine_autoregressive(d, context_dim, self.flow_hidden_dims)
            elif self.transform == "spline_autoregressive":
                layer = ConditionalSplineAutoregressive(
                    d,
                    context_dim,
                    self.flow_hidden_dims,
                    count_bins=self.count_bins,
                    bound=self.bound,
                )
            else:
                layer = T.conditional_affine_coupling(d, context_dim, self.flow_hidden_dims)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        # Permutations between layers mix the dimensions' roles: reversals for the spline
        # layers (each layer then transforms what the previous one conditioned on), fixed
        # random ones for Pyro's affine layers (whose masked networks are randomly ordered).
        generator = torch.Generator().manual_seed(0)
        if self.transform.startswith("spline"):
            perms = [torch.arange(d).flip(0)] * self.num_transforms
        else:
            perms = [torch.randperm(d, generator=generator) for _ in range(self.num_transforms)]
        self.register_buffer("permutations", torch.stack(perms) if d > 1 else torch.zeros(0))
        if self.box_index is not None:
            k = len(self.box_index)
            self.box_layer = (
                ConditionalBoxSplineAutoregressive(
                    k, context_dim, self.flow_hidden_dims, count_bins=self.count_bins
                )
                if k > 1
                else ConditionalSplineCoupling(
                    1, context_dim, self.flow_hidden_dims, count_bins=self.count_bins, bound=1.0
                )
            )

    def _posterior(self, context):
        mean, std = self.latent_standardize.mean, self.latent_standardize.std
        if self._flow_builder is not None:
            return _StandardizedFlow(self.flow(context), mean, std, self.latent_dim)
        d = self.latent_dim
        base = dist.Normal(context.new_zeros(d), context.new_ones(d))
        base = base.expand(context.shape[:-1] + (d,)).to_event(1)
        transforms = []
        layers = self.layers
        for i, layer in enumerate(layers):
            t = layer.condition(context)
            if self.fast == "log_prob" and d > 1 and self.transform in _AUTOREGRESSIVE:
                t = t.inv
            transforms.append(t)
            if d > 1 and i < len(layers) - 1:
                transforms.append(dist.transforms.Permute(self.permutations[i], cache_size=1))
        # Every layer caches its last pair, so a draw's density reuses the pass that drew it.
        transforms.append(dist.transforms.AffineTransform(mean, std, event_dim=1, cache_size=1))
        if self.box_index is not None:
            box = self.box_layer.condition(context)
            if self.fast == "log_prob" and len(self.box_index) > 1:
                box = box.inv
            if len(self.box_index) == d:
                transforms += [self._box_clamp(), box]
            else:
                transforms += [
                    OnCoordinates(self._box_clamp(), self.box_index),
                    OnCoordinates(box, self.box_index),
                ]
        return dist.TransformedDistribution(base, transforms)


def _state_local_param(name, p):
    """A ``param`` statement for a module-local parameter (no param store), carrying the
    ``unconstrained`` link that SVI's parameter capture reads, as PyroModule does for its
    PyroParams."""
    p.unconstrained = weakref.ref(p)
    effectful(type="param")(lambda *_, **__: p)(name, p, constraint=constraints.real, name=name)


def _resettable(module, path):
    """The modules whose ``reset_parameters`` re-initialize ``module`` (called ``path`` in
    the guide): its own, or else its submodules'."""
    if callable(getattr(module, "reset_parameters", None)):
        return [module]
    if next(module.parameters(recurse=False), None) is not None:
        raise TypeError(
            f"reset_parameters: the guide's network {path!r} ({type(module).__name__}) holds "
            "parameters of its own but has no reset_parameters() to draw fresh ones; give it "
            "one (covering its submodules), or keep training from the current weights "
            "(fit_sequential(retrain='never'))."
        )
    return [
        m for name, child in module.named_children() for m in _resettable(child, f"{path}.{name}")
    ]


class _StoredBuffer:
    """A buffer of a child module mirrored in Pyro's param store, so that the store's
    ``save``/``load`` carry it: the standardization statistics, and the masks and orders of
    autoregressive layers (drawn at random when a layer is built). A floating-point buffer
    is held by the module as a detached alias of the stored tensor (no gradient reaches it;
    in-place updates such as :meth:`~pyro_jc.nn.Standardize.fit` write through to the
    store); an integer or boolean one (fixed once built) is stored as a floating-point copy
    (exact for the small integers of an order)."""

    def __init__(self, name, module, attr):
        self.name, self.module, self.attr = name, module, attr
        self.stored = self.alias = None

    def sync(self, store, full=True):
        """Bring the module's buffer and the store's value together; ``full=False`` only
        notices a buffer the module replaced (``.to()``, ``load_state_dict``)."""
        module = self.module
        current = module._buffers[self.attr]
        if not full and current is self.alias:
            return
        stored = store[self.name] if self.name in store else None
        if stored is not None and stored is self.stored and current is self.alias:
            return
        floating = current.is_floating_point()
        if stored is None or stored is self.stored:
            # New, or the module replaced its buffer (.to(), load_state_dict): store it.
            value = current.detach()
            store[self.name] = value.clone() if floating else value.to(torch.float64)
            stored = store[self.name]
        elif stored.shape != current.shape:
            raise ValueError(
                f"Pyro's param store holds {self.name!r} with shape {tuple(stored.shape)}, "
                f"but the guide's buffer has shape {tuple(current.shape)}: the store was saved "
                "from a guide of the same name for another model. Call "
                "pyro.clear_param_store(), or use pyro.get_param_store().scope()."
            )
        elif floating and (stored.dtype != current.dtype or stored.device != current.device):
            # The store's value wins (loaded, or set by an earlier guide of this name).
            store[self.name] = stored.detach().to(current)
            stored = store[self.name]
        self.stored = stored
        self.alias = stored.detach() if floating else stored.detach().to(current)
        module._buffers[self.attr] = self.alias
        if hasattr(module, "_state_changed"):
            module._state_changed()


class _StandardizedFlow(dist.TorchDistribution):
    """A flow's conditional distribution over standardized latents ``v`` (zuko's, or any
    torch distribution with ``rsample`` and ``log_prob``), as the distribution of
    ``u = mean + std * v``. ``expand`` adds leading batch dims (drawn as a sample shape), as
    the guide's plates over draws need."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, flow, mean, std, features, batch_shape=None):
        self.flow, self.loc, self.scale = flow, mean, std
        flow_batch = torch.Size(flow.batch_shape)
        batch_shape = flow_batch if batch_shape is None else torch.Size(batch_shape)
        extra = len(batch_shape) - len(flow_batch)
        if extra < 0 or batch_shape[extra:] != flow_batch:
            raise NotImplementedError(
                f"A flow= distribution of batch shape {tuple(flow_batch)} can only gain "
                f"leading batch dims, not become {tuple(batch_shape)}."
            )
        self._extra = batch_shape[:extra]
        super().__init__(batch_shape, torch.Size([features]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _StandardizedFlow(self.flow, self.loc, self.scale, self.event_shape[0], batch_shape)

    def rsample(self, sample_shape=()):
        v = self.flow.rsample(torch.Size(sample_shape) + self._extra)
        return self.loc + self.scale * v

    def log_prob(self, value):
        v = (value - self.loc) / self.scale
        return self.flow.log_prob(v) - self.scale.log().sum(-1)


# ---------------------------------------------------------------------------------------------
# Site distributions


class _Carried(dist.TorchDistribution):
    """A latent site of the joined draw: its value comes from ``propose(batch_shape)`` (drawn
    only when the site is not replayed). At the value the site took (``is_own(value)``) its
    density is zero except on the one site that carries ``log_density()``, the joint
    ``log q(z | x)`` at the values all sites took; any other value is scored by
    ``score(value)``, never silently by the joint density of the value the site took."""

    arg_constraints = {}
    has_rsample = True

    def __init__(self, propose, shape, event_dim, support, log_density, is_own, score):
        self.propose = propose
        self._support = support
        self.log_density = log_density
        self.is_own = is_own
        self.score = score
        self._cached = None
        shape = torch.Size(shape)
        super().__init__(
            shape[: len(shape) - event_dim], shape[len(shape) - event_dim :], validate_args=False
        )

    @dist.constraints.dependent_property
    def support(self):
        return self._support

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return _Carried(
            self.propose,
            shape,
            len(self.event_shape),
            self._support,
            self.log_density,
            self.is_own,
            self.score,
        )

    def rsample(self, sample_shape=()):
        batch_shape = torch.Size(sample_shape) + self.batch_shape
        z = self.propose(batch_shape)
        shape = batch_shape + self.event_shape
        if z.shape == shape:
            return z
        # The joined draw is padded to the plate nesting; the site may have dropped the pad.
        return z.expand(shape) if z.dim() <= len(shape) else z.reshape(shape)

    def log_prob(self, value):
        batch = value.shape[: value.dim() - len(self.event_shape)]
        if not self.is_own(value):
            log_q = self.score(value)
        elif self.log_density is None:
            return value.new_zeros(batch)
        else:
            if self._cached is None:
                self._cached = self.log_density()
            log_q = self._cached
        shape = torch.Size(torch.broadcast_shapes(log_q.shape, batch))
        # A global site in a plate carries the joint density once, spread over its elements.
        return log_q.expand(shape) * (_numel(log_q.shape) / _numel(shape))


class _plates:
    """Enter the (non-data) plates of a global site, as in the model."""

    def __init__(self, frames):
        self.plates = [pyro.plate(f.name, f.size, dim=f.dim) for f in frames]

    def __enter__(self):
        for p in self.plates:
            p.__enter__()

    def __exit__(self, *exc):
        for p in reversed(self.plates):
            p.__exit__(*exc)
