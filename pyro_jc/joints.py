"""Drawing pairs ``(z, x)`` from the two joints every pyro_jc loss compares.

* The **guide joint** ``q(z|x) k(x)``: ``x`` is the data passed to the guide (a minibatch of
  ``k``) and ``z ~ q(z|x)``; the model is replayed against the guide's latents so that both
  traces score the same pair (:func:`guide_joint_traces`).
* The **model joint** ``p(z, x)``: the model run forward with its observed sites released
  (:func:`model_joint_trace`), as forward-KL and adversarial losses need.

This module also finds the data plate, validates traces and turns Pyro's failures into errors
that name the site and the remedy. Losses build on it; nothing here depends on a loss.
"""

from __future__ import annotations

import inspect
import math
import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape

from .distributions import INVALID_KEY, SimulatorSites
from .errors import (
    ImplicitDensityError,
    JointContrastiveError,
    MissingGuideSiteError,
    NonFiniteError,
    ObservationArgumentError,
    ObservationShapeError,
    PlateShapeError,
    UnsampleableSiteError,
    VectorizationWarning,
)

#: Name of the plate Pyro's :class:`~pyro.infer.elbo.ELBO` puts around vectorized particles.
PARTICLE_PLATE = "num_particles_vectorized"

_LIKELIHOOD_FREE_HINT = (
    "Losses that never evaluate this density are pyro_jc.ForwardKL (simulation-based training "
    "of the guide) and pyro_jc.AdversarialELBO (a discriminator estimates the density ratio)."
)


# ---------------------------------------------------------------------------------------------
# Arguments of the losses


def check_num_particles(num_particles):
    """Raise ``ValueError`` unless ``num_particles`` is a positive integer."""
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}.")


def check_data_entropy(data_entropy):
    """``data_entropy`` as a float (``None`` stays ``None``); ``ValueError`` for anything
    that is not a finite real number (in nats per datapoint)."""
    if data_entropy is None:
        return None
    if isinstance(data_entropy, bool) or not isinstance(data_entropy, int | float):
        raise ValueError(
            "data_entropy must be a number (the entropy of the data distribution in nats per "
            f"datapoint) or None; got {data_entropy!r}."
        )
    if not math.isfinite(data_entropy):
        raise ValueError(f"data_entropy must be finite, got {data_entropy!r}.")
    return float(data_entropy)


# ---------------------------------------------------------------------------------------------
# Site selection


def sample_sites(trace):
    """Sample sites of ``trace`` in execution order, without plate subsample sites."""
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def latent_sites(trace):
    """Sample sites without observed values."""
    return [site for site in sample_sites(trace) if not site["is_observed"]]


def observed_sites(trace):
    """Sample sites with observed values (``obs=``)."""
    return [site for site in sample_sites(trace) if site["is_observed"]]


def data_frames(site):
    """Vectorized plates around ``site``, excluding the particle plate pyro_jc adds."""
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE]


# ---------------------------------------------------------------------------------------------
# The data plate: which plate indexes datapoints x ~ k


def find_data_plate(model_trace, name=None):
    """The plate over datapoints: the one named ``name`` or, by default, the outermost
    (leftmost ``dim``) plate shared by every observed site.

    :param model_trace: a model trace.
    :param str name: optional plate name chosen by the user.
    :returns: the plate's :class:`~pyro.poutine.indep_messenger.CondIndepStackFrame`, or
        ``None`` when the observed sites share no plate (one datapoint).
    """
    observed = observed_sites(model_trace)
    if name is not None:
        for site in sample_sites(model_trace):
            for frame in data_frames(site):
                if frame.name == name:
                    return frame
        raise ValueError(
            f"data_plate={name!r} was given but no sample site of the model is inside a plate "
            f"of that name; plates seen: {sorted(_plate_names(model_trace))}."
        )
    if not observed:
        return None
    shared = set(data_frames(observed[0]))
    for site in observed[1:]:
        shared &= set(data_frames(site))
    if not shared:
        return None
    return min(shared, key=lambda f: f.dim)


def _plate_names(trace):
    return {f.name for site in sample_sites(trace) for f in data_frames(site)}


def plate_nesting(*traces):
    """Depth of the vectorized plates around the sample sites of ``traces`` (0 if none)."""
    dims = [
        frame.dim
        for trace in traces
        for site in sample_sites(trace)
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def num_datapoints(frame):
    """Number of datapoints in the full data set: the plate's full size (1 without a plate)."""
    if frame is None:
        return 1
    return frame.full_size if frame.full_size is not None else frame.size


def in_plate(site, frame):
    return frame is not None and any(f == frame for f in site["cond_indep_stack"])


def sum_to_datapoints(tensor, site, frame, particle_dim=None):
    """Sum a site's batch-shaped ``tensor`` (a log density) to one value per datapoint.

    Dims of plates nested inside the data plate belong to one datapoint and are summed, as
    are the dims of plates outside it.

    :param frame: the data plate (see :func:`find_data_plate`) or ``None``.
    :param int particle_dim: the (negative) dim of vectorized particles, kept when given.
    :returns: shape ``(batch,)``, or ``(num_particles, batch)`` with ``particle_dim``; a site
        outside the data plate gives ``batch = 1``.
    """
    ndim = tensor.dim()
    keep = []
    if particle_dim is not None and -particle_dim <= ndim:
        keep.append(ndim + particle_dim)
    has_data_dim = in_plate(site, frame) and -frame.dim <= ndim
    if has_data_dim:
        keep.append(ndim + frame.dim)
    other = [d for d in range(ndim) if d not in keep]
    if other:
        tensor = tensor.sum(other)
    if not has_data_dim:
        tensor = tensor.unsqueeze(-1)
    if particle_dim is not None and tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    return tensor


# ---------------------------------------------------------------------------------------------
# The guide joint, scored by the model


def guide_joint_traces(model, guide, args, kwargs, max_plate_nesting=math.inf):
    """Draw ``z ~ q(z | x)`` for the data ``x`` in ``args``/``kwargs`` and score the pair
    under the model, by Pyro's ``trace`` and ``replay``.

    Consumes the random number stream exactly as :class:`~pyro.infer.Trace_ELBO` does, so
    both estimators see the same pairs under the same seed.

    :returns: ``(model_trace, guide_trace)``, pruned of subsample sites, with model
        ``log_prob`` and guide ``score_parts`` computed.
    :raises MissingGuideSiteError: a latent site of the model is not in the guide.
    :raises ImplicitDensityError: a model or guide site cannot evaluate ``log_prob``.
    :raises PlateShapeError: a site's batch shape disagrees with its plates.
    """
    guide_trace = _run_traced(guide, "guide", args, kwargs)
    try:
        model_trace = _run_traced(poutine.replay(model, trace=guide_trace), "model", args, kwargs)
    except ValueError as e:
        # Typically a distribution rejecting NaN parameters computed from a bad guide draw.
        check_guide_values_finite(guide_trace, cause=e)
        raise

    if is_validation_enabled():
        check_no_extra_data_dims(model_trace)
        check_guide_covers_model(model_trace, guide_trace)
        try:
            check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
        except ValueError as e:
            if "shapes disagree" not in str(e):
                raise
            raise PlateShapeError(
                f"{e}. The guide draws the site with other dims than the model. With an "
                "amortized guide, the usual cause is data with extra leading dims, which the "
                "guide reads as a batch of observations (one posterior each): pass one "
                "observation shaped as the model's site, and keep batches of observations "
                "for the guide's queries (guide.sample_posterior(x_batch))."
            ) from e

    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    compute_log_prob(model_trace, "model")
    compute_score_parts(guide_trace)
    if is_validation_enabled():
        check_plate_shapes(model_trace, "model", max_plate_nesting)
        check_plate_shapes(guide_trace, "guide", max_plate_nesting)
    return model_trace, guide_trace


def _run_traced(fn, role, args, kwargs):
    try:
        return poutine.trace(fn).get_trace(*args, **kwargs)
    except ValueError as e:
        if "Shape mismatch inside plate" in str(e):
            remedy = (
                _VECTORIZATION_HINT
                if f"plate('{PARTICLE_PLATE}')" in str(e)
                else "A tensor's batch dims must match the sizes of the plates around its "
                "site: index data with the plate's indices (subsampling), or give the site's "
                "distribution matching batch dims (.expand(), .to_event())."
            )
            raise PlateShapeError(f"In the {role}: {e}\n{remedy}") from e
        raise


def check_no_extra_data_dims(model_trace):
    """Raise :class:`ObservationShapeError` for observed data with more dims than their
    site's distribution: the model would broadcast the distribution over them outside any
    plate (Pyro's shape check refuses that too, less plainly), while an amortized guide
    reads them as a batch of observations, one posterior each."""
    for site in sample_sites(model_trace):
        if not site["is_observed"]:
            continue
        data, expected = tuple(site["value"].shape), tuple(site["fn"].shape())
        if len(data) > len(expected):
            raise ObservationShapeError(
                f"Observed site {site['name']!r}: the data have shape {data}, more dims than "
                f"its distribution's {expected} (batch {tuple(site['fn'].batch_shape)}, event "
                f"{tuple(site['fn'].event_shape)}). Put the extra dims in a pyro.plate or the "
                "event shape, or pass one observation (a batch of observations is for an "
                "amortized guide's queries, e.g. guide.sample_posterior(x_batch))."
            )


def check_guide_covers_model(model_trace, guide_trace):
    """Raise :class:`MissingGuideSiteError` if a model latent has no guide site."""
    guide_names = {site["name"] for site in sample_sites(guide_trace)}
    for site in latent_sites(model_trace):
        if site["name"] in guide_names:
            continue
        if site["infer"].get("_enumerate_dim") is not None:
            continue
        raise MissingGuideSiteError(
            f"Latent site {site['name']!r} is sampled in the model but not in the guide, so the "
            "model would draw it from its prior and the loss would be wrong. Add "
            f"pyro.sample({site['name']!r}, ...) to the guide, or pass it as observed data "
            "(obs=...) in the model."
        )


def compute_log_prob(trace, role, remedy=None):
    """``trace.compute_log_prob()``, naming the site whose density cannot be evaluated.

    :param str remedy: what the error suggests instead of the likelihood-free losses."""
    try:
        trace.compute_log_prob()
    except (NotImplementedError, ValueError) as e:
        site = next((s for s in sample_sites(trace) if "log_prob" not in s), None)
        if site is None or not is_missing_density(e):
            raise
        raise implicit_density_error(site, role, remedy) from e


def compute_score_parts(guide_trace):
    """``trace.compute_score_parts()``, naming the guide site without a density."""
    try:
        guide_trace.compute_score_parts()
    except (NotImplementedError, ValueError) as e:
        site = next(
            (s for s in sample_sites(guide_trace) if "score_parts" not in s),
            None,
        )
        if site is None or not is_missing_density(e):
            raise
        raise implicit_density_error(site, "guide") from e


def is_missing_density(error):
    """Whether ``error`` (or what it wraps: Pyro re-raises ``log_prob`` failures as
    ``ValueError``) says a distribution has no density."""
    while error is not None:
        if isinstance(error, NotImplementedError):
            return True
        error = error.__cause__
    return False


def implicit_density_error(site, role, remedy=None):
    kind = "observed" if site["is_observed"] else "latent"
    remedy = remedy or f"This loss needs log p(z, x) and log q(z | x). {_LIKELIHOOD_FREE_HINT}"
    return ImplicitDensityError(
        f"{role.capitalize()} site {site['name']!r} ({kind}, {type(site['fn']).__name__}) "
        f"cannot evaluate log_prob: its density is implicit (sample-only). {remedy}"
    )


def check_plate_shapes(trace, role, max_plate_nesting):
    """Pyro's ``check_site_shape`` on every site, re-raised with the trace's role."""
    for site in sample_sites(trace):
        try:
            check_site_shape(site, max_plate_nesting)
        except ValueError as e:
            raise PlateShapeError(
                f"In the {role}, site {site['name']!r}: batch shape "
                f"{tuple(site['fn'].batch_shape)} disagrees with its plates "
                f"{_describe_plates(site)}.\n{e}"
            ) from e


def check_observed_shapes(trace, leading_dims=False):
    """Raise :class:`ObservationShapeError` for an observed site whose data are not shaped
    like its distribution (up to leading dims of size 1 that the data leave out). Pyro
    tolerates data that merely broadcast, an extra leading dim of size 1 say, but simulated
    data take the distribution's shape, so a guide trained on them would meet the real data
    in another shape.

    :param bool leading_dims: allow extra leading dims (a batch of observations, as an
        amortized guide takes them)."""
    for site in sample_sites(trace):
        if not site["is_observed"]:
            continue
        data, expected = tuple(site["value"].shape), tuple(site["fn"].shape())
        if leading_dims and len(data) > len(expected):
            data = data[len(data) - len(expected) :]
        padded = (1,) * (len(expected) - len(data)) + data
        if padded != expected:
            raise ObservationShapeError(
                f"Observed site {site['name']!r}: the data have shape {data}, but its "
                f"distribution (batch {tuple(site['fn'].batch_shape)}, event "
                f"{tuple(site['fn'].event_shape)}) draws values of shape {expected}, and "
                "simulations take that shape. Pass data of that shape (e.g. drop a leading "
                "dim of size 1 with x[0]), or put the extra dims in a pyro.plate or the "
                "distribution's event shape."
            )


def _describe_plates(site):
    frames = [f for f in site["cond_indep_stack"] if f.vectorized]
    if not frames:
        return "(none: the site is outside every plate)"
    return ", ".join(f"{f.name}(size={f.size}, dim={f.dim})" for f in frames)


class GuideJointTraces:
    """Mixin for :class:`~pyro.infer.elbo.ELBO` subclasses that score pairs from the guide
    joint: Pyro's particle machinery (``num_particles``, ``vectorize_particles``) with
    pyro_jc's validation, including when ``max_plate_nesting`` is guessed."""

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = guide_joint_traces(
            model, guide, args, kwargs, self.max_plate_nesting
        )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _particle_dim(self):
        """Dim of the vectorized particle plate, or ``None`` for sequential particles."""
        if self.vectorize_particles and self.num_particles > 1:
            return -self.max_plate_nesting
        return None

    def _guess_max_plate_nesting(self, model, guide, args, kwargs):
        # Same random draws as Pyro's guess (one guide run, one replayed model run).
        with poutine.block():
            model_trace, guide_trace = guide_joint_traces(model, guide, args, kwargs)
        self.max_plate_nesting = plate_nesting(model_trace, guide_trace)
        if self.vectorize_particles and self.num_particles > 1:
            self.max_plate_nesting += 1


# ---------------------------------------------------------------------------------------------
# Non-finite values


def check_guide_values_finite(guide_trace, cause=None):
    """Raise :class:`NonFiniteError` naming the first guide site with NaN or inf values."""
    for site in sample_sites(guide_trace):
        if not bool(torch.isfinite(site["value"]).all()):
            raise NonFiniteError(
                f"Guide site {site['name']!r} returned non-finite values (NaN or inf). Check the "
                "guide's network outputs (locations finite, scales positive), lower the learning "
                "rate, or clip gradients."
            ) from cause


def raise_nonfinite(model_trace, guide_trace, value):
    """Raise :class:`NonFiniteError` naming the first site that explains a non-finite loss.

    Called only once a loss came out non-finite, so the checks cost nothing on good steps.
    """
    check_guide_values_finite(guide_trace)
    for site in latent_sites(model_trace):
        support = site["fn"].support
        if not bool(support.check(site["value"]).all()):
            raise NonFiniteError(
                f"Guide site {site['name']!r} drew values outside the model's support "
                f"({support}), so the model's log density is not finite. Give the guide a "
                "distribution with the same support (e.g. LogNormal or Gamma for positive "
                "latents, or transform with torch.distributions.biject_to(support))."
            )
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        for site in sample_sites(trace):
            if not bool(torch.isfinite(site["log_prob"]).all()):
                raise NonFiniteError(
                    f"{role.capitalize()} site {site['name']!r} has a non-finite log density "
                    f"at the sampled value: the value lies outside the support of "
                    f"{type(site['fn']).__name__} or its parameters are NaN/inf. Make the guide's "
                    "support match the model's (e.g. constrained distributions or biject_to) "
                    "and check parameters for NaN."
                )
    raise NonFiniteError(
        f"The loss is non-finite ({value}) although every site's log density is finite; "
        "check model parameters and the data for NaN or overflow."
    )


# ---------------------------------------------------------------------------------------------
# The model joint


def model_joint_trace(model, args, kwargs, num_samples=None, max_plate_nesting=None):
    """Draw pairs ``(z, x) ~ p(z, x)`` by running ``model`` with its observed sites released
    (:func:`pyro.poutine.uncondition`); the original observations stay in each site's
    ``infer["obs"]``.

    :param int num_samples: draw this many pairs at once in a vectorized plate placed left of
        the model's plates (dim ``-max_plate_nesting - 1``); ``None`` draws one.
    :param int max_plate_nesting: nesting depth of the model's plates (required with
        ``num_samples``).
    :returns: the model trace, pruned of subsample sites.
    """
    fn = SimulatorSites()(poutine.uncondition(model))
    if num_samples is not None:
        if max_plate_nesting is None or max_plate_nesting == math.inf:
            raise ValueError("model_joint_trace needs a finite max_plate_nesting to vectorize.")
        if num_samples > 1:
            fn = _SimulationDimCheck(num_samples, max_plate_nesting)(fn)
        fn = pyro.plate(PARTICLE_PLATE, num_samples, dim=-max_plate_nesting - 1)(fn)
    return prune_subsample_sites(trace_model(fn, args, kwargs))


_VECTORIZATION_HINT = (
    "Under a plate over simulations (or particles) every tensor of the model gains a leading "
    "batch dim, so the model must be vectorization-safe: reduce over event dims only "
    "(z.sum(-1), not z.sum()), index from the right (z[..., 0], not z[0]), and avoid "
    "reshapes with fixed sizes. A pyro_jc autoguide follows the model's shapes, so the "
    "model is the place to fix. Or draw one simulation per model run: "
    "ForwardKL(vectorize_particles=False), simulate(..., vectorize=False)."
)


class _SimulationDimCheck(Messenger):
    """Warns about an observed site whose distribution, before the plate over simulations
    broadcasts it, has no dim for the simulations: every simulation then draws its data
    from one distribution. Either the model is not vectorization-safe (it sums or indexes
    over the simulations, and training would be silently wrong) or the site depends on no
    latent (an ancillary observation, harmless): only the user can tell, so this warns
    (once per site and shape, through the warnings filter) rather than refuses."""

    def __init__(self, num_samples, max_plate_nesting):
        super().__init__()
        self.num_samples, self.dim = num_samples, -max_plate_nesting - 1

    def _process_message(self, msg):
        if msg["type"] != "sample" or not msg["infer"].get("was_observed"):
            return
        shape = msg["fn"].batch_shape
        if len(shape) >= -self.dim and shape[self.dim] == self.num_samples:
            return
        warnings.warn(
            f"Observed site {msg['name']!r}: under a plate of simulations at dim {self.dim}, "
            f"its distribution has batch shape {tuple(shape)}, without that dim, so every "
            "simulation draws its data from the same distribution. If the site depends on a "
            "latent, the model is not vectorization-safe and training would be wrong. "
            + _VECTORIZATION_HINT
            + " (If the site depends on no latent, it carries no information and this "
            "warning can be ignored.)",
            VectorizationWarning,
            stacklevel=2,
        )


def trace_model(model, args, kwargs):
    """``poutine.trace(model).get_trace(*args, **kwargs)``, with Pyro's failures that come
    from the user's model turned into errors naming the site: a batch shape unlike its
    plates (:class:`PlateShapeError`), a distribution that cannot be sampled
    (:class:`UnsampleableSiteError`)."""
    current = _CurrentSite()
    try:
        return _run_traced(current(model), "model", args, kwargs)
    except NotImplementedError as e:
        if current.msg is None or isinstance(e, JointContrastiveError):
            raise
        site = current.msg
        raise UnsampleableSiteError(
            f"Site {site['name']!r} ({type(site['fn']).__name__}) cannot be sampled, but "
            "pyro_jc draws it from the model: to inspect the model, and to simulate pairs "
            "(ForwardKL, simulate, sbc, the adversarial loss). Give it a proper prior, e.g. "
            f"a Uniform over a plausible range instead of an improper one. ({e})"
        ) from e


class _CurrentSite(Messenger):
    """Remembers the sample statement in progress, to name a site whose sampling fails."""

    def __init__(self):
        super().__init__()
        self.msg = None

    def _process_message(self, msg):
        if msg["type"] == "sample":
            self.msg = msg

    def _postprocess_message(self, msg):
        if msg["type"] == "sample":
            self.msg = None


def model_joint_pairs(model, args, kwargs, num_samples=None, max_plate_nesting=None, pad=False):
    """Pairs ``(z, x) ~ p(z, x)`` from :func:`model_joint_trace`, as detached tensors.

    :param int num_samples: pairs drawn at once in a plate over simulations (dim
        ``-max_plate_nesting - 1``); ``None`` draws one unbatched pair.
    :param int max_plate_nesting: the model's plate depth.
    :param bool pad: give an unbatched pair the layout of a plate over one simulation (a
        leading dim of size 1, the batch dims padded to the nesting).
    :returns: ``(latents, observations, invalid)``: ``{site: value}`` of the latent and of
        the (released) observed sites, and a boolean mask of invalid simulations (see
        ``Implicit(on_invalid="drop")``) or ``None`` when no site reported any.
    """
    trace = model_joint_trace(
        model, args, kwargs, num_samples, max_plate_nesting if num_samples is not None else None
    )
    latents, observations = {}, {}
    for site in sample_sites(trace):
        released = site["infer"].get("was_observed")
        if site["is_observed"] and not released:
            continue
        (observations if released else latents)[site["name"]] = site["value"].detach()
    invalid = _invalid_per_simulation(trace, num_samples)
    if num_samples is None and pad:
        latents, observations = (
            {
                k: with_simulation_dim(v, len(trace.nodes[k]["fn"].event_shape), max_plate_nesting)
                for k, v in values.items()
            }
            for values in (latents, observations)
        )
    return latents, observations, invalid


def prior_latents(model, args, kwargs, num_samples, max_plate_nesting):
    """``num_samples`` draws of the latents from the prior, in one vectorized model run with
    the observed sites left observed (no simulator runs): ``{site: value}`` in a bank's
    layout (the draws along dim 0, a plate at dim ``-max_plate_nesting - 1``).

    :param int max_plate_nesting: the model's plate depth (finite).
    """
    fn = pyro.plate(PARTICLE_PLATE, num_samples, dim=-max_plate_nesting - 1)(model)
    trace = prune_subsample_sites(trace_model(fn, args, kwargs))
    return {
        site["name"]: site["value"].detach()
        for site in sample_sites(trace)
        if not site["is_observed"]
    }


def with_simulation_dim(value, event_dim, max_plate_nesting):
    """An unbatched site value in the layout of a plate over one simulation: batch dims
    padded to ``max_plate_nesting`` and a leading dim of size 1."""
    batch_dims = value.dim() - event_dim
    return value.reshape((1,) * (max_plate_nesting + 1 - batch_dims) + value.shape)


def _invalid_per_simulation(trace, num):
    masks = [s["infer"][INVALID_KEY] for s in sample_sites(trace) if INVALID_KEY in s["infer"]]
    if not masks:
        return None
    if num is None:
        return torch.stack([m.any() for m in masks]).any().reshape(1)
    out = None
    for m in masks:
        m = m.reshape(m.shape[0], -1).any(-1) if m.dim() > 0 else m.expand(num)
        out = m if out is None else out | m
    return out


def observed_values(trace):
    """``{name: data}`` of the sites observed in the model (also after ``uncondition``)."""
    values = {}
    for site in sample_sites(trace):
        if site["is_observed"]:
            values[site["name"]] = site["value"]
        elif site["infer"].get("was_observed"):
            values[site["name"]] = site["infer"]["obs"]
    return values


def values_trace(values):
    """A trace holding ``values`` as unobserved sample sites, for :func:`pyro.poutine.replay`."""
    trace = poutine.Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", value=value, is_observed=False, infer={})
    return trace


# ---------------------------------------------------------------------------------------------
# Passing observations to the guide


class ObservationArguments:
    """Where each observed site's data enters the model's arguments, so simulated data can be
    given to the guide through the same argument that carries the real data.

    :param model: the model (its signature resolves argument names).
    :param observations: ``None`` to find each argument automatically (the argument that *is*
        the site's ``obs`` tensor, else the one equal to it); a dict from site name to an
        argument name or position; or a callable ``observations(values, *args, **kwargs)``
        returning new ``(args, kwargs)`` for ``values = {site: simulated data}``.
    """

    def __init__(self, model, observations=None):
        if not (observations is None or callable(observations) or isinstance(observations, dict)):
            raise TypeError(
                "observations must be None, a dict {site name: argument name or position}, or "
                f"a callable; got {type(observations).__name__}."
            )
        self.model = model
        self.observations = observations

    def locate(self, obs, args, kwargs):
        """``{site: ("arg", position) or ("kwarg", name)}`` for each observed site.

        :param dict obs: ``{site: real data}`` from a model trace (:func:`observed_values`).
        """
        locations = {name: self._locate(name, data, args, kwargs) for name, data in obs.items()}
        seen = {}
        for name, where in locations.items():
            if where in seen:
                raise ObservationArgumentError(
                    f"Observed sites {seen[where]!r} and {name!r} both take their data from "
                    f"argument {where[1]!r}; pass observations=callable(values, *args, **kwargs) "
                    "that builds the arguments from both simulated values."
                )
            seen[where] = name
        return locations

    @staticmethod
    def read(locations, args, kwargs):
        """``{site: data}`` read from the arguments at ``locations``."""
        return {
            name: args[key] if kind == "arg" else kwargs[key]
            for name, (kind, key) in locations.items()
        }

    def substitute(self, locations, values, args, kwargs):
        """Arguments with each observed site's data replaced by ``values[site]``.

        :param dict locations: from :meth:`locate` (unused with a callable
            ``observations``, which builds the arguments itself).
        """
        if callable(self.observations):
            new_args, new_kwargs = self.observations(values, *args, **kwargs)
            return tuple(new_args), dict(new_kwargs)
        args, kwargs = list(args), dict(kwargs)
        for name, value in values.items():
            kind, key = locations[name]
            if kind == "arg":
                args[key] = value
            else:
                kwargs[key] = value
        return tuple(args), kwargs

    def _locate(self, name, data, args, kwargs):
        if isinstance(self.observations, dict):
            if name not in self.observations:
                raise ObservationArgumentError(
                    f"observations= does not say which argument carries observed site {name!r}; "
                    f"it maps {sorted(self.observations)}."
                )
            return self._resolve(name, self.observations[name], args, kwargs)
        candidates = [(k, i) for k, i, v in _arguments(args, kwargs) if v is data]
        if not candidates:
            candidates = [
                (k, i)
                for k, i, v in _arguments(args, kwargs)
                if torch.is_tensor(v) and v.shape == data.shape and bool(torch.equal(v, data))
            ]
        if len(candidates) == 1:
            return candidates[0]
        what = "no argument" if not candidates else f"several arguments ({candidates})"
        raise ObservationArgumentError(
            f"Cannot tell which argument carries the data of observed site {name!r}: {what} of "
            "the model holds its obs tensor. Pass observations={" + repr(name) + ": 'x'} (the "
            "argument's name or position), or a callable building the arguments from the "
            "simulated values."
        )

    def _resolve(self, name, key, args, kwargs):
        if isinstance(key, int):
            if not -len(args) <= key < len(args):
                raise ObservationArgumentError(
                    f"observations[{name!r}] = {key} but the model got {len(args)} positional "
                    "arguments."
                )
            return ("arg", key % len(args))
        if key in kwargs:
            return ("kwarg", key)
        try:
            params = list(inspect.signature(self.model).parameters)
        except (TypeError, ValueError):
            params = []
        if key in params and params.index(key) < len(args):
            return ("arg", params.index(key))
        raise ObservationArgumentError(
            f"observations[{name!r}] = {key!r}, but the model was called without an argument of "
            f"that name (keyword arguments: {sorted(kwargs)}, signature: {params})."
        )


def _arguments(args, kwargs):
    for i, v in enumerate(args):
        yield "arg", i, v
    for k, v in kwargs.items():
        yield "kwarg", k, v
