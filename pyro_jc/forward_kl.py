r"""Forward KL from the model joint to the guide joint: simulation-based training.

    KL[p(z, x) || q(z|x) k(x)] = const - E_{(z, x) ~ p(z, x)}[log q(z | x)]

Pairs are simulated by running the model with its observed sites released, so the likelihood
(and the prior) may be black-box simulators (:class:`~pyro_jc.Implicit`); only the guide's
density is evaluated. This is neural posterior estimation, as an SVI loss. Banks of
simulations live in :mod:`pyro_jc.simulation`, the training loop in :mod:`pyro_jc.training`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI
from pyro.infer.elbo import ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import apply_stack

from . import training
from .devices import to_device
from .distributions import SimulatorSites
from .errors import MissingGuideSiteError, NonFiniteError, PlateShapeError
from .joints import (
    PARTICLE_PLATE,
    check_num_particles,
    check_plate_shapes,
    compute_log_prob,
    model_joint_pairs,
    sample_sites,
    values_trace,
    with_simulation_dim,
)
from .layout import LayoutCache
from .simulation import SimulationBank, SimulationStream, StoredBank, batches
from .store import BankStore

#: Pairs of a bank from which an autoguide's standardization is fitted.
STANDARDIZATION_PAIRS = 100_000


class ForwardKL(ELBO):
    r"""Forward KL (simulation-based) loss for an amortized guide,

    .. math::

        L(\phi) = -\mathbb{E}_{(z, x) \sim p(z, x)} [\log q_\phi(z \mid x)],

    which equals :math:`\mathrm{KL}[p(z,x) \| q_\phi(z|x)k(x)]` up to a constant. Each step
    draws ``num_particles`` pairs ``(z, x)`` from the model with its observed sites released
    (one vectorized model run: a plate over simulations left of the model's plates), gives
    the simulated ``x`` to the guide through the argument that carries the real data, replays
    the simulated ``z`` into it and minimizes the average ``-log q(z | x)``. The minimizer is
    the exact posterior ``q(z|x) = p(z|x)`` for every ``x`` the model can produce, so after
    training ``guide(x_obs)`` samples the posterior of the real data.

    Only the guide's density is evaluated: the likelihood and the prior may be implicit
    (:class:`~pyro_jc.Implicit`), non-differentiable, numpy; discrete latents need no
    score-function estimator. Model parameters are **not** trained (the loss does not depend
    on them); a warning says so when the model has any. This is the objective of neural
    posterior estimation (NPE) and of Pyro's :class:`~pyro.infer.CSIS`, vectorized.

    The simulated observations have a leading dim of size ``num_particles`` (the simulation
    plate, at dim ``-max_plate_nesting - 1``), so the guide must treat leading dims of its
    data argument as batch dims, as the amortized autoguides
    (:class:`~pyro_jc.AutoAmortizedNormal`, :class:`~pyro_jc.AutoAmortizedFlow`) do.

    **Simulation banks.** For expensive simulators, draw a fixed bank once with
    :func:`~pyro_jc.simulate` and pass it as ``simulations``: each step then takes the next
    minibatch of ``num_particles`` pairs of the bank's training split (a
    :class:`torch.utils.data.DataLoader`, reshuffled every epoch) and simulates nothing.
    :meth:`fit` (:func:`pyro_jc.training.fit`) runs epochs with a held-out validation split,
    early stopping and restoring the best guide. Without a bank, :meth:`fit` trains for a
    budget of steps or seconds and anneals the learning rate over it.

    The model is inspected once per model and argument shapes
    (:class:`~pyro_jc.layout.ModelLayout`): the same loss may serve data sets of several
    sizes.

    :param int num_particles: pairs per step (the minibatch size with a bank).
    :param max_plate_nesting: nesting depth of the model's plates; found from one model run
        if omitted.
    :param bool vectorize_particles: simulate all pairs of a step in one vectorized run
        (default); ``False`` runs the model and guide once per pair.
    :param observations: which argument of the model carries each observed site's data
        (see :class:`~pyro_jc.joints.ObservationArguments`); found automatically by default.
    :param simulations: a bank from :func:`~pyro_jc.simulate` (or a
        :class:`~pyro_jc.simulation.SimulationBank`), to train on instead of fresh
        simulations; or a bank on disk (a :class:`~pyro_jc.store.BankStore` from
        ``simulate(..., path=...)``, or a :class:`~pyro_jc.simulation.StoredBank`), read a few
        chunks at a time, so that a bank larger than memory trains.
    :param float validation_fraction: share of the bank held out for validation (with a bank;
        whole chunks, the last ones, of a bank on disk; default 0.1).
    :param validation_simulations: a bank held out for validation, in the forms
        ``simulations`` takes, instead of a split of ``simulations`` (which then all train).
        Keep one held-out bank when a bank grows, as :func:`~pyro_jc.fit_sequential` does over
        its rounds: a fresh split of the grown bank would validate on pairs already trained
        on, which read optimistic.
    :param float clip_norm: clip the global gradient norm of the guide's parameters to this
        value in :meth:`loss_and_grads` (``None``: no clipping).
    :param torch.Generator generator: random source of the bank's split and shuffling
        (default: torch's global generator, seeded by :func:`pyro.set_rng_seed`).
    :param int num_workers: with fresh simulations, draw each step's pairs in this many
        worker processes ahead of training (a :class:`~pyro_jc.simulation.SimulationStream`;
        the ``parallel`` extra), so that a slow simulator runs while the optimizer steps.
        Each pair is used once; the model is pickled to the workers.
    :param shard: ``(rank, world_size)`` in data-parallel training
        (:class:`~pyro_jc.distributed.DistributedOptim`): train on this process's share of
        the bank's training split (``bank.shard(rank, world_size)``; by whole chunks for a
        bank on disk, so each process reads only its own files). Every process must build
        the same split (seed them alike before, or pass equal ``generator``\ s), which is
        checked when :mod:`torch.distributed` is initialized; the validation split and the
        guide's standardization come from the whole splits on every process, so that early
        stopping decides alike everywhere.

    References

    [1] Fast epsilon-free inference of simulation models with Bayesian conditional density
    estimation, G. Papamakarios, I. Murray (2016)

    [2] Inference compilation and universal probabilistic programming, T. A. Le, A. G. Baydin,
    F. Wood (2017)
    """

    def __init__(
        self,
        num_particles: int = 200,
        max_plate_nesting: float = math.inf,
        vectorize_particles: bool = True,
        *,
        observations: dict | Callable | None = None,
        simulations: dict | SimulationBank | None = None,
        validation_fraction: float | None = None,
        validation_simulations: dict | SimulationBank | None = None,
        clip_norm: float | None = 5.0,
        generator: torch.Generator | None = None,
        num_workers: int = 1,
        shard: tuple[int, int] | None = None,
    ) -> None:
        check_num_particles(num_particles)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}.")
        if num_workers > 1 and not vectorize_particles:
            raise ValueError(
                "num_workers > 1 draws each step's pairs in one vectorized model run per "
                "chunk; it needs vectorize_particles=True (a simulator that cannot take a "
                "batch still runs one draw at a time inside it: Implicit(vectorized=False))."
            )
        #: Worker processes simulating ahead of training (fresh simulations).
        self.num_workers = num_workers
        self._stream = None  # (layout, SimulationStream)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        self.observations = observations
        self.clip_norm = clip_norm
        self.generator = generator
        self.diagnostics = {}
        #: Simulations dropped as invalid so far (see ``Implicit(on_invalid="drop")``).
        self.num_invalid = 0
        #: The bank's training and validation splits (:class:`SimulationBank`\ s).
        self.bank = self.validation_bank = None
        if validation_simulations is not None and (
            simulations is None or validation_fraction is not None
        ):
            raise ValueError(
                "ForwardKL(validation_simulations=...) holds out a bank for validating "
                "training on simulations=bank: give simulations=, and leave "
                "validation_fraction out (the training bank is not split)."
            )
        if simulations is not None:
            bank = _as_bank(simulations)
            if validation_simulations is None:
                fraction = 0.1 if validation_fraction is None else validation_fraction
                self.bank, self.validation_bank = bank.split(fraction, generator)
            else:
                self.bank, self.validation_bank = bank, _as_bank(validation_simulations)
            # Standardization comes from the whole training split, the same on every rank.
            self._standardization_bank = self.bank
            if shard is not None:
                self._check_same_split(shard)
                self.bank = self.bank.shard(*shard)
            self._batch_size = min(num_particles, len(self.bank))
            self._loader = batches(
                self.bank, self._batch_size, shuffle=True, generator=generator, drop_last=True
            )
            self._batches = None
        elif shard is not None:
            raise ValueError(
                "shard= shares a bank (simulations=...) among processes; with fresh "
                "simulations each process draws its own pairs: seed the processes apart."
            )
        self._layouts = LayoutCache(observations)
        self._checked = weakref.WeakSet()  # the layouts checked (and warned about)
        self._warned = set()

    def _check_same_split(self, shard):
        """Every rank must share out the same training split (else shares overlap and the
        validation losses, hence early stopping, differ): compare a fingerprint."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        fingerprint = [
            len(self.bank),
            0 if self.validation_bank is None else len(self.validation_bank),
        ]
        for bank in (self.bank, self.validation_bank):
            if bank is not None:
                latents, _ = bank.head(16)
                fingerprint += [round(float(v.double().sum()), 6) for v in latents.values()]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, fingerprint)
        if any(f != everyone[0] for f in everyone):
            raise ValueError(
                f"ForwardKL(shard={tuple(shard)}): the processes split the bank differently "
                "into training and validation parts. Seed them alike before building the "
                "loss (pyro.set_rng_seed), or pass generator=torch.Generator().manual_seed(s) "
                "with the same s everywhere."
            )

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("ForwardKL draws pairs from the model joint, not traces.")

    @property
    def steps_per_epoch(self) -> int | None:
        """Steps in one pass over the bank's training split (``None`` without a bank): what
        :func:`pyro_jc.training.fit` runs as an epoch."""
        return None if self.bank is None else len(self._loader)

    # -- set-up -----------------------------------------------------------------------------

    def _layout(self, model, args, kwargs):
        """The model's layout for these arguments (one model run per model and argument
        shapes, which simulates nothing), checked once."""
        layout = self._layouts(model, args, kwargs)
        if layout in self._checked:
            return layout
        layout.check_observed_shapes()
        if not layout.observed_sites:
            raise ValueError(
                "ForwardKL found no observed site in the model: give the data with "
                "pyro.sample(name, dist, obs=data) so that the loss knows what to simulate."
            )
        if not layout.latent_sites:
            raise ValueError(
                "ForwardKL found no latent site in the model: every sample site is observed, "
                "so there is no posterior to learn. Leave obs= off the sites to infer."
            )
        if self.bank is not None:
            for bank in (self.bank, self.validation_bank):
                if bank is not None:
                    bank.check_layout(layout)
        params = layout.params
        if params and "params" not in self._warned:
            self._warned.add("params")
            warnings.warn(
                f"ForwardKL does not train model parameters ({', '.join(params[:5])}"
                f"{', ...' if len(params) > 5 else ''}): the loss -E_p[log q(z|x)] only "
                "trains the guide. Fit the model with JointContrastiveELBO or "
                "AdversarialELBO, or fix its parameters.",
                UserWarning,
                stacklevel=5,
            )
        self._checked.add(layout)
        return layout

    def _nesting(self, layout):
        return (
            layout.plate_nesting if self.max_plate_nesting == math.inf else self.max_plate_nesting
        )

    # -- pairs ------------------------------------------------------------------------------

    def _pairs(self, model, args, kwargs, layout):
        """Yield ``(latents, observations, invalid, plate_size)`` batches of pairs."""
        nesting = self._nesting(layout)
        if self.bank is not None:
            latents, sims = self._next_batch()
            latents, sims = _placed(latents, layout), _placed(sims, layout)
            yield latents, sims, None, next(iter(sims.values())).shape[0]
        elif self.num_workers > 1:
            latents, sims, invalid = next(self._simulations(model, args, kwargs, layout))
            yield _placed(latents, layout), _placed(sims, layout), invalid, self.num_particles
        elif self.vectorize_particles:
            latents, sims, invalid = model_joint_pairs(
                model, args, kwargs, self.num_particles, nesting
            )
            yield latents, sims, invalid, self.num_particles
        else:
            for _ in range(self.num_particles):
                latents, sims, invalid = model_joint_pairs(model, args, kwargs, None, nesting)
                yield latents, sims, invalid, None

    def _simulations(self, model, args, kwargs, layout):
        """The stream of fresh pairs from worker processes, one per model layout (new data
        shapes start a new one)."""
        if self._stream is None or self._stream[0] is not layout:
            if self._stream is not None:
                self._stream[1].close()
            stream = SimulationStream(
                model,
                args,
                kwargs,
                self.num_particles,
                self._nesting(layout),
                self.num_workers,
            )
            self._stream = (layout, stream)
        return self._stream[1]

    def _next_batch(self):
        """The next minibatch of the bank's training split (a new epoch when one ends)."""
        if self._batches is not None:
            batch = next(self._batches, None)
            if batch is not None:
                return batch
        self._batches = iter(self._loader)
        return next(self._batches)

    def _log_q(self, guide, args, kwargs, layout, latents, sims, plate_size):
        """``log q(z | x)`` per simulation, shape ``(plate_size,)`` (or ``(1,)``)."""
        nesting = self._nesting(layout)
        guide_args, guide_kwargs = layout.substitute(sims, args, kwargs)
        hoisted = _HoistParams()
        replayed = poutine.replay(hoisted(guide), trace=values_trace(latents))
        if plate_size is not None:
            replayed = pyro.plate(PARTICLE_PLATE, plate_size, dim=-nesting - 1)(replayed)
        with SimulatorSites():
            guide_trace = poutine.trace(replayed).get_trace(*guide_args, **guide_kwargs)
        hoisted.restate()
        self._check_guide(guide_trace, latents, layout)
        compute_log_prob(
            guide_trace,
            "guide",
            remedy="ForwardKL maximizes log q(z | x): use a guide with a density (normal, flow: "
            "pyro_jc.AutoAmortizedFlow), or train an implicit guide with "
            "pyro_jc.AdversarialELBO.",
        )
        if pyro.infer.util.is_validation_enabled():
            check_plate_shapes(guide_trace, "guide", nesting + (plate_size is not None))
        total = 0.0
        for site in sample_sites(guide_trace):
            total = total + _per_simulation(site["log_prob"], plate_size, nesting)
        return total, guide_trace

    def _check_guide(self, guide_trace, latents, layout):
        for site in sample_sites(guide_trace):
            if site["name"] not in latents:
                continue
            value = latents[site["name"]]
            expected = value.shape[: value.dim() - layout.event_dims.get(site["name"], 0)]
            actual = site["fn"].batch_shape
            if _broadcast(actual, expected) != expected:
                raise PlateShapeError(
                    f"Guide site {site['name']!r} has batch shape {tuple(actual)} but the "
                    f"simulated latent has batch shape {tuple(expected)}. The guide's data "
                    "argument carries a leading dim of simulations; reduce over data dims with "
                    "keepdim=True (or reshape) so that each simulation gets its own "
                    "distribution in the model's batch layout. (A pyro_jc autoguide follows "
                    "the model's shapes: there the model is not vectorization-safe (it sums or "
                    "indexes over the simulations); fix it, or use "
                    "ForwardKL(vectorize_particles=False).)"
                )
        names = {s["name"] for s in sample_sites(guide_trace)}
        for name in latents:
            if name not in names:
                raise MissingGuideSiteError(
                    f"Latent site {name!r} is sampled in the model but not in the guide, so "
                    f"ForwardKL cannot evaluate log q(z | x) at the simulated {name!r}. Add "
                    f"pyro.sample({name!r}, ...) to the guide."
                )
        for site in sample_sites(guide_trace):
            if site["name"] not in latents and not site["is_observed"]:
                raise MissingGuideSiteError(
                    f"Guide site {site['name']!r} is not a latent site of the model. ForwardKL "
                    "evaluates log q(z | x) by replaying the simulated latents into the guide, "
                    "so every guide site must be a model latent (auxiliary variables, as in "
                    "Pyro's AutoContinuous guides, have no replayed value). Use "
                    "pyro_jc.AutoAmortizedNormal / AutoAmortizedFlow or sample the model's "
                    "sites directly."
                )

    # -- loss -------------------------------------------------------------------------------

    def _evaluate(self, model, guide, args, kwargs):
        layout = self._layout(model, args, kwargs)
        total = 0.0
        count = 0
        num_invalid = 0
        pairs = self._pairs(model, args, kwargs, layout)
        one_at_a_time = self.bank is None and not self.vectorize_particles
        if one_at_a_time:
            # The guide's standardization is fitted from all pairs of the step at once (one
            # pair has no spread), in the layout of a plate over simulations.
            pairs = list(pairs)
            latents, sims, invalid = (
                self._stacked([pair[k] for pair in pairs], layout) for k in range(3)
            )
            self._standardize(guide, args, kwargs, layout, latents, sims, invalid)
        for latents, sims, invalid, size in pairs:
            if not one_at_a_time:
                self._standardize(guide, args, kwargs, layout, latents, sims, invalid)
            log_q, guide_trace = self._log_q(guide, args, kwargs, layout, latents, sims, size)
            if invalid is not None:
                num_invalid += int(invalid.sum())
                log_q = torch.where(invalid, torch.zeros_like(log_q), log_q)
                count += int((~invalid).sum())
            else:
                count += log_q.numel()
            total = total + log_q.sum()
            if not bool(torch.isfinite(log_q).all()):
                _raise_nonfinite(guide_trace)
        if num_invalid:
            self._report_invalid(num_invalid, count + num_invalid)
        if count == 0:
            raise NonFiniteError(
                "Every simulation of this step was invalid (dropped by on_invalid='drop'); "
                "restrict the prior to parameters the simulator handles."
            )
        loss = -total / count
        self.diagnostics = {
            "loss": float(loss.detach()),
            "num_simulations": count,
            "num_invalid": num_invalid,
        }
        return loss

    def _stacked(self, batches, layout):
        """Unbatched pairs' values (dicts of tensors, or invalid masks) stacked along a
        leading simulation dim in the vectorized layout."""
        if batches[0] is None:
            return None
        if torch.is_tensor(batches[0]):
            return torch.cat(batches)
        nesting = self._nesting(layout)
        return {
            name: torch.cat(
                [
                    with_simulation_dim(b[name], layout.event_dims.get(name, 0), nesting)
                    for b in batches
                ]
            )
            for name in batches[0]
        }

    def _standardize(self, guide, args, kwargs, layout, latents, sims, invalid):
        """Let a guide that standardizes its inputs (the amortized autoguides) fit the
        statistics once, from the bank's training split or the first simulations."""
        if getattr(guide, "is_standardized", True) or not hasattr(guide, "standardize"):
            return
        if getattr(guide, "prototype_trace", False) is None:
            with poutine.block(hide_types=["sample"]):
                guide(*args, **kwargs)  # sets the guide up from the model's own arguments
        if self.bank is not None:
            # Statistics from (up to) the first STANDARDIZATION_PAIRS pairs: all of a bank in
            # memory, a few chunks of one on disk.
            latents, sims = self._standardization_bank.head(STANDARDIZATION_PAIRS)
        elif invalid is not None:
            latents = {k: v[~invalid] for k, v in latents.items()}
            sims = {k: v[~invalid] for k, v in sims.items()}
        guide.standardize(observations=_placed(sims, layout), latents=_placed(latents, layout))

    def _report_invalid(self, num_invalid, num):
        self.num_invalid += num_invalid
        if "invalid" not in self._warned:
            self._warned.add("invalid")
            warnings.warn(
                f"ForwardKL dropped {num_invalid} of {num} simulations with non-finite output "
                "this step (counted in loss.num_invalid and loss.diagnostics['num_invalid']); "
                "this warning is shown once.",
                UserWarning,
                stacklevel=4,
            )

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        :returns: an estimate of ``-E_p[log q(z | x)]`` (nats per simulated pair).
        :rtype: float
        """
        with torch.no_grad():
            return float(self._evaluate(model, guide, args, kwargs))

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        :returns: the loss as a differentiable tensor (gradients reach the guide only).
        :rtype: torch.Tensor
        """
        return self._evaluate(model, guide, args, kwargs)

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Computes the loss, back-propagates it into the guide's parameters and clips their
        global gradient norm to ``clip_norm``.

        :returns: an estimate of the loss.
        :rtype: float
        """
        loss = self._evaluate(model, guide, args, kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
            if self.clip_norm is not None:
                params = [p for _, p in pyro.get_param_store().named_parameters()]
                params = [p for p in params if p.grad is not None]
                if params:
                    torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        return float(loss.detach())

    # -- bank training ----------------------------------------------------------------------

    def validation_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Average ``-log q(z | x)`` over the bank's validation split.

        :rtype: float
        """
        if self.bank is None:
            raise ValueError("validation_loss needs a simulation bank (simulations=...).")
        if self.validation_bank is None:
            raise ValueError("The bank has no validation split (validation_fraction=0).")
        layout = self._layout(model, args, kwargs)
        total, count = 0.0, 0
        with torch.no_grad():
            for latents, sims in batches(self.validation_bank, self._batch_size):
                latents, sims = _placed(latents, layout), _placed(sims, layout)
                size = next(iter(sims.values())).shape[0]
                log_q, _ = self._log_q(guide, args, kwargs, layout, latents, sims, size)
                total += float(log_q.sum())
                count += log_q.numel()
        return -total / count

    def fit(self, svi: SVI, *args: Any, **kwargs: Any) -> dict:
        """Train the guide with :func:`pyro_jc.training.fit`: with a bank, epochs over its
        training split with validation, early stopping and learning-rate decay at plateaus;
        with fresh simulations, a budget of ``num_steps`` or ``seconds`` with the learning
        rate annealed by a cosine over it (new pairs cannot be overfit: on sbibm's
        ``two_moons``, 60 s of 1,000 pairs per step gave C2ST 0.58 at a constant 1e-3 and
        0.51 annealed from 4e-3; see the benchmarks page).

        :param pyro.infer.SVI svi: an SVI object whose loss is this ``ForwardKL``.
        :param args: the model's arguments (the real data where the guide's data argument
            goes); keyword arguments are :func:`~pyro_jc.training.fit`'s, then the model's.
        :returns: :func:`~pyro_jc.training.fit`'s history; with fresh simulations also
            ``"simulations"``, the number of pairs drawn.
        """
        if getattr(svi.loss_and_grads, "__self__", None) is not self:
            raise ValueError("fit(svi): svi must have been built with loss=this ForwardKL.")
        if self.bank is None and kwargs.get("max_epochs") is not None:
            raise ValueError(
                "fit: max_epochs bounds training on a bank (ForwardKL(simulations=bank)); "
                "with fresh simulations give num_steps or seconds."
            )
        if self.bank is not None and (
            kwargs.get("num_steps") is not None or kwargs.get("seconds") is not None
        ):
            raise ValueError(
                "fit: with a bank, training ends by early stopping on the validation split "
                "(bound it with max_epochs); num_steps and seconds budget fresh simulations."
            )
        kwargs.setdefault("progress", False)
        history = training.fit(svi, *args, **kwargs)
        if self.bank is None:
            history["simulations"] = history["steps"] * self.num_particles
        return history


# ---------------------------------------------------------------------------------------------
# Helpers


class _HoistParams(Messenger):
    """Stops the guide's ``param`` statements at the guide (they still return their values)
    and, with :meth:`restate`, makes the same statements again outside ForwardKL's handlers.
    Each handler between a statement and SVI's parameter capture (simulation plate, guide
    trace, replay) costs time per parameter, and a flow guide has dozens of tensors."""

    def __init__(self):
        super().__init__()
        self.statements = {}  # by name: a parameter stated twice is captured once anyway

    def _pyro_param(self, msg):
        self.statements[msg["name"]] = msg
        msg["stop"] = True

    def restate(self):
        # The values are known: a message that arrives with its value skips the param store.
        for msg in self.statements.values():
            apply_stack(
                {
                    **msg,
                    "cond_indep_stack": (),
                    "done": False,
                    "stop": False,
                    "continuation": None,
                    "scale": 1.0,
                    "mask": None,
                }
            )


def _as_bank(simulations):
    if isinstance(simulations, BankStore):
        return StoredBank(simulations)
    if isinstance(simulations, SimulationBank | StoredBank):
        return simulations
    return SimulationBank(simulations)


def _broadcast(a, b):
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError:
        return None


def _per_simulation(log_prob, plate_size, max_plate_nesting):
    """Sum a site's log density to one value per simulation."""
    if plate_size is None:
        return log_prob.sum().reshape(1)
    dim = log_prob.dim() - max_plate_nesting - 1
    if dim < 0:  # a site that did not broadcast along the simulation plate
        return log_prob.sum().expand(plate_size)
    dims = [d for d in range(log_prob.dim()) if d != dim]
    return log_prob.sum(dims) if dims else log_prob


def _placed(values, layout):
    """Bank tensors on the device of the model's data, floating ones in the floating dtype of
    the model's site (a float64 bank trains a float32 model)."""
    device = next(iter(layout.observations.values())).device
    out = {}
    for name, value in values.items():
        site_value = layout.site(name)["value"]
        floating = value.is_floating_point() and site_value.is_floating_point()
        dtype = site_value.dtype if floating else None
        out[name] = to_device(value, device, dtype)
    return out


def _raise_nonfinite(guide_trace):
    for site in sample_sites(guide_trace):
        if not bool(torch.isfinite(site["log_prob"]).all()):
            raise NonFiniteError(
                f"Guide site {site['name']!r} has a non-finite log q(z | x) at simulated "
                "latents: the guide's support must cover the prior's (constrained latents need "
                "a guide on the same support, e.g. via biject_to), and its network outputs "
                "must stay finite (standardize the observations, lower the learning rate)."
            )
    raise NonFiniteError("ForwardKL: the loss is non-finite although every log q is finite.")
