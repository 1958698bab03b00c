r"""Forward KL from the model joint to the guide joint: simulation-based training.

    KL[p(z, x) || q(z|x) k(x)] = const - E_{(z, x) ~ p(z, x)}[log q(z | x)]

Pairs are simulated by running the model with its observed sites released, so the likelihood
(and the prior) may be black-box simulators (:class:`~pyro_jc.Implicit`); only the guide's
density is evaluated. This is neural posterior estimation, as an SVI loss.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import apply_stack

from .distributions import INVALID_KEY, SimulatorSites
from .errors import MissingGuideSiteError, NonFiniteError, PlateShapeError
from .joints import (
    PARTICLE_PLATE,
    ObservationArguments,
    check_observed_shapes,
    check_plate_shapes,
    compute_log_prob,
    latent_sites,
    model_joint_trace,
    observed_values,
    plate_nesting,
    sample_sites,
    values_trace,
)
from .training import LearningRateFactor


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
    :func:`simulate` and pass it as ``simulations``: each step then takes the next minibatch
    of ``num_particles`` pairs of the bank's training split (reshuffled every epoch) and
    simulates nothing. :meth:`fit` runs epochs with a held-out validation split, early
    stopping and restoring the best guide. Without a bank, :meth:`fit` trains for a budget
    of steps or seconds and anneals the learning rate over it.

    :param int num_particles: pairs per step (the minibatch size with a bank).
    :param max_plate_nesting: nesting depth of the model's plates; found from one model run
        if omitted.
    :param bool vectorize_particles: simulate all pairs of a step in one vectorized run
        (default); ``False`` runs the model and guide once per pair.
    :param observations: which argument of the model carries each observed site's data
        (see :class:`~pyro_jc.joints.ObservationArguments`); found automatically by default.
    :param dict simulations: a bank from :func:`simulate`, to train on instead of fresh
        simulations.
    :param float validation_fraction: share of the bank held out for validation (with a bank).
    :param float clip_norm: clip the global gradient norm of the guide's parameters to this
        value in :meth:`loss_and_grads` (``None``: no clipping).
    :param torch.Generator generator: random source of the bank's split and shuffling
        (default: torch's global generator, seeded by :func:`pyro.set_rng_seed`).

    References

    [1] Fast epsilon-free inference of simulation models with Bayesian conditional density
    estimation, G. Papamakarios, I. Murray (2016)

    [2] Inference compilation and universal probabilistic programming, T. A. Le, A. G. Baydin,
    F. Wood (2017)
    """

    def __init__(
        self,
        num_particles=200,
        max_plate_nesting=math.inf,
        vectorize_particles=True,
        *,
        observations=None,
        simulations=None,
        validation_fraction=0.1,
        clip_norm=5.0,
        generator=None,
    ):
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
        self.bank = None
        if simulations is not None:
            self.bank = SimulationBank(
                simulations, validation_fraction, num_particles, generator=generator
            )
        self._arguments = None
        self._warned = set()
        self._pad_unbatched = False

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("ForwardKL draws pairs from the model joint, not traces.")

    # -- setup ------------------------------------------------------------------------------

    def _setup(self, model, args, kwargs):
        """Plate depth, model-parameter warning and argument lookup, from one model run with
        the data observed (which simulates nothing)."""
        if self._arguments is not None and self._arguments.model is model:
            return
        with poutine.block():
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        check_observed_shapes(trace)
        if self.max_plate_nesting == math.inf:
            self.max_plate_nesting = plate_nesting(trace)
        params = [name for name, site in trace.nodes.items() if site["type"] == "param"]
        if params and "params" not in self._warned:
            self._warned.add("params")
            warnings.warn(
                f"ForwardKL does not train model parameters ({', '.join(params[:5])}"
                f"{', ...' if len(params) > 5 else ''}): the loss -E_p[log q(z|x)] only "
                "trains the guide. Fit the model with JointContrastiveELBO or the adversarial "
                "guide, or fix its parameters.",
                UserWarning,
                stacklevel=4,
            )
        self._arguments = ObservationArguments(model, self.observations)
        self._prototype_obs = observed_values(trace)
        self._event_dims = {s["name"]: len(s["fn"].event_shape) for s in sample_sites(trace)}
        if not self._prototype_obs:
            raise ValueError(
                "ForwardKL found no observed site in the model: give the data with "
                "pyro.sample(name, dist, obs=data) so that the loss knows what to simulate."
            )

    # -- pairs ------------------------------------------------------------------------------

    def _simulate(self, model, args, kwargs, num):
        """``num`` pairs from the model (vectorized), as ``(latents, observations, invalid)``
        with the simulation dim leftmost; ``num=None`` draws one unbatched pair."""
        trace = model_joint_trace(
            model, args, kwargs, num, self.max_plate_nesting if num is not None else None
        )
        latents = {
            s["name"]: s["value"].detach()
            for s in latent_sites(trace)
            if not s["infer"].get("was_observed")
        }
        sims = {
            s["name"]: s["value"].detach()
            for s in sample_sites(trace)
            if s["infer"].get("was_observed")
        }
        invalid = _invalid_per_simulation(trace, num)
        if num is None and self._pad_unbatched:
            # An unbatched run gives sites fewer batch dims than a plate over simulations
            # would; banks store that vectorized layout (simulation dim, then the plates).
            latents, sims = (
                {
                    k: _with_simulation_dim(v, trace.nodes[k], self.max_plate_nesting)
                    for k, v in values.items()
                }
                for values in (latents, sims)
            )
        return latents, sims, invalid, observed_values(trace)

    def _pairs(self, model, args, kwargs):
        """Yield ``(latents, observations, invalid, plate_size, real_obs)`` batches of pairs."""
        if self.bank is not None:
            latents, sims = self.bank.next_batch()
            device = _device_of(self._prototype_obs)
            latents = {k: v.to(device) for k, v in latents.items()}
            sims = {k: v.to(device) for k, v in sims.items()}
            size = next(iter(sims.values())).shape[0]
            yield latents, sims, None, size, self._prototype_obs
        elif self.vectorize_particles:
            latents, sims, invalid, obs = self._simulate(model, args, kwargs, self.num_particles)
            yield latents, sims, invalid, self.num_particles, obs
        else:
            for _ in range(self.num_particles):
                latents, sims, invalid, obs = self._simulate(model, args, kwargs, None)
                yield latents, sims, invalid, None, obs

    def _log_q(self, guide, args, kwargs, latents, sims, plate_size, obs):
        """``log q(z | x)`` per simulation, shape ``(plate_size,)`` (or ``(1,)``)."""
        guide_args, guide_kwargs = self._arguments.substitute(obs, sims, args, kwargs)
        hoisted = _HoistParams()
        replayed = poutine.replay(hoisted(guide), trace=values_trace(latents))
        if plate_size is not None:
            dim = -self.max_plate_nesting - 1
            replayed = pyro.plate(PARTICLE_PLATE, plate_size, dim=dim)(replayed)
        with SimulatorSites():
            guide_trace = poutine.trace(replayed).get_trace(*guide_args, **guide_kwargs)
        hoisted.restate()
        self._check_guide(guide_trace, latents)
        compute_log_prob(
            guide_trace,
            "guide",
            remedy="ForwardKL maximizes log q(z | x): use a guide with a density (normal, flow: "
            "pyro_jc.AutoAmortizedFlow), or train an implicit guide with "
            "pyro_jc.AdversarialELBO.",
        )
        if pyro.infer.util.is_validation_enabled():
            nesting = self.max_plate_nesting + (1 if plate_size is not None else 0)
            check_plate_shapes(guide_trace, "guide", nesting)
        total = 0.0
        for site in sample_sites(guide_trace):
            total = total + _per_simulation(site["log_prob"], plate_size, self.max_plate_nesting)
        return total, guide_trace

    def _check_guide(self, guide_trace, latents):
        for site in sample_sites(guide_trace):
            if site["name"] not in latents:
                continue
            value = latents[site["name"]]
            expected = value.shape[: value.dim() - self._event_dims.get(site["name"], 0)]
            actual = site["fn"].batch_shape
            if _broadcast(actual, expected) != expected:
                raise PlateShapeError(
                    f"Guide site {site['name']!r} has batch shape {tuple(actual)} but the "
                    f"simulated latent has batch shape {tuple(expected)}. The guide's data "
                    "argument carries a leading dim of simulations; reduce over data dims with "
                    "keepdim=True (or reshape) so that each simulation gets its own "
                    "distribution in the model's batch layout."
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
        self._setup(model, args, kwargs)
        total = 0.0
        count = 0
        num_invalid = 0
        pairs = self._pairs(model, args, kwargs)
        one_at_a_time = self.bank is None and not self.vectorize_particles
        if one_at_a_time:
            # The guide's standardization is fitted from all pairs of the step at once (one
            # pair has no spread), in the layout of a plate over simulations.
            pairs = list(pairs)
            latents, sims, invalid = (self._stacked([pair[k] for pair in pairs]) for k in range(3))
            self._standardize(guide, args, kwargs, latents, sims, invalid)
        for latents, sims, invalid, size, obs in pairs:
            if not one_at_a_time:
                self._standardize(guide, args, kwargs, latents, sims, invalid)
            log_q, guide_trace = self._log_q(guide, args, kwargs, latents, sims, size, obs)
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

    def _stacked(self, batches):
        """Unbatched pairs' values (dicts of tensors, or invalid masks) stacked along a
        leading simulation dim in the vectorized layout."""
        if batches[0] is None:
            return None
        if torch.is_tensor(batches[0]):
            return torch.cat(batches)
        out = {}
        for name in batches[0]:
            event_dim = self._event_dims.get(name, 0)
            values = [b[name] for b in batches]
            out[name] = torch.cat(
                [
                    v.reshape((1,) * (self.max_plate_nesting + 1 - (v.dim() - event_dim)) + v.shape)
                    for v in values
                ]
            )
        return out

    def _standardize(self, guide, args, kwargs, latents, sims, invalid):
        """Let a guide that standardizes its inputs (the amortized autoguides) fit the
        statistics once, from the bank's training split or the first simulations."""
        if getattr(guide, "is_standardized", True) or not hasattr(guide, "standardize"):
            return
        if getattr(guide, "prototype_trace", False) is None:
            with poutine.block(hide_types=["sample"]):
                guide(*args, **kwargs)  # sets the guide up from the model's own arguments
        if self.bank is not None:
            latents, sims = self.bank.training_split()
        elif invalid is not None:
            latents = {k: v[~invalid] for k, v in latents.items()}
            sims = {k: v[~invalid] for k, v in sims.items()}
        device = _device_of(self._prototype_obs)
        guide.standardize(
            observations={k: v.to(device) for k, v in sims.items()},
            latents={k: v.to(device) for k, v in latents.items()},
        )

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

    def loss(self, model, guide, *args, **kwargs):
        """
        :returns: an estimate of ``-E_p[log q(z | x)]`` (nats per simulated pair).
        :rtype: float
        """
        with torch.no_grad():
            return float(self._evaluate(model, guide, args, kwargs))

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """
        :returns: the loss as a differentiable tensor (gradients reach the guide only).
        :rtype: torch.Tensor
        """
        return self._evaluate(model, guide, args, kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
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

    def validation_loss(self, model, guide, *args, **kwargs):
        """Average ``-log q(z | x)`` over the bank's validation split.

        :rtype: float
        """
        if self.bank is None:
            raise ValueError("validation_loss needs a simulation bank (simulations=...).")
        self._setup(model, args, kwargs)
        total, count = 0.0, 0
        device = _device_of(self._prototype_obs)
        with torch.no_grad():
            for latents, sims in self.bank.validation_batches():
                latents = {k: v.to(device) for k, v in latents.items()}
                sims = {k: v.to(device) for k, v in sims.items()}
                size = next(iter(sims.values())).shape[0]
                log_q, _ = self._log_q(
                    guide, args, kwargs, latents, sims, size, self._prototype_obs
                )
                total += float(log_q.sum())
                count += log_q.numel()
        return -total / count

    def fit(
        self,
        svi,
        *args,
        max_epochs=None,
        patience=20,
        lr_decays=2,
        lr_factor=0.2,
        decay_patience=5,
        num_steps=None,
        seconds=None,
        anneal=True,
        progress=False,
        **kwargs,
    ):
        """Train the guide, in the way that suits where the pairs come from.

        **With a bank** (``ForwardKL(simulations=bank)``): epochs of ``svi.step`` over the
        training split, the validation split evaluated after each epoch. When ``patience``
        epochs pass without improvement, the parameters of the best epoch are restored and,
        up to ``lr_decays`` times, training goes on from them with the learning rate
        multiplied by ``lr_factor`` (and ``decay_patience`` epochs of patience); then it
        stops. The guide left behind is the best one seen (param store and, for an
        ``nn.Module`` guide, its state).

        **With fresh simulations** (no bank): ``svi.step`` until the budget, ``num_steps``
        steps or ``seconds`` of wall clock (whichever ends first), is spent. New pairs cannot
        be overfit, so there is no validation; instead the learning rate follows a cosine
        from its initial value down to a thousandth of it over the budget [3], which removes
        most of the step noise from the final guide (on sbibm's ``two_moons``, 60 s of 1,000
        pairs per step: C2ST 0.58 at a constant 1e-3, 0.51 annealed from 4e-3; see the
        benchmarks page).

        In both modes the rates change only through torch's schedulers
        (:class:`~pyro_jc.training.LearningRateFactor`), as multiples of the rates the
        optimizer was configured with (per-parameter arguments included). The optimizer is
        left at the last rate, and calling ``fit`` again starts from the configured rates:
        ``fit(num_steps=20)`` then ``fit(num_steps=500)`` trains like one 500-step fit from
        where the first left the guide. A learning-rate scheduler in ``svi.optim`` owns the
        learning rate: it is neither decayed nor annealed (nor stepped).

        :param pyro.infer.SVI svi: an SVI object whose loss is this ``ForwardKL``.
        :param args: the model's arguments (the real data where the guide's data argument
            goes).
        :param int max_epochs: bank: upper bound on epochs (default: no bound).
        :param int patience: bank: epochs without validation improvement before the first
            stop.
        :param int lr_decays: bank: how many times to go on at a lower learning rate (``0``:
            stop at the first stop, as sbi does).
        :param float lr_factor: bank: learning-rate multiplier at each decay.
        :param int decay_patience: bank: patience after a decay.
        :param int num_steps: fresh: the number of steps.
        :param float seconds: fresh: the wall-clock budget in seconds.
        :param bool anneal: fresh: anneal the learning rate over the budget (``False``: keep
            it constant).
        :param bool progress: show a tqdm progress bar (over epochs with a bank, over steps
            otherwise).
        :returns: with a bank, ``{"train_loss": [...], "validation_loss": [...],
            "best_epoch": int, "epochs": int, "decay_epochs": [...]}`` (losses per epoch,
            nats per pair; the epochs after which the learning rate was lowered); with fresh
            simulations, ``{"train_loss": [...], "steps": int, "simulations": int,
            "seconds": float}`` (the loss of every step).

        References

        [3] SGDR: Stochastic Gradient Descent with Warm Restarts, I. Loshchilov, F. Hutter
        (2017)
        """
        if getattr(svi.loss_and_grads, "__self__", None) is not self:
            raise ValueError("fit(svi): svi must have been built with loss=this ForwardKL.")
        if self.bank is None:
            if max_epochs is not None:
                raise ValueError(
                    "fit: max_epochs bounds training on a bank (ForwardKL(simulations=bank)); "
                    "with fresh simulations give num_steps or seconds."
                )
            return self._fit_fresh(svi, args, kwargs, num_steps, seconds, anneal, progress)
        if num_steps is not None or seconds is not None:
            raise ValueError(
                "fit: with a bank, training ends by early stopping on the validation split "
                "(bound it with max_epochs); num_steps and seconds budget fresh simulations."
            )
        if not 0 < lr_factor < 1:
            raise ValueError(f"fit: lr_factor must lie in (0, 1), got {lr_factor}.")
        if lr_decays < 0 or decay_patience < 1 or patience < 1:
            raise ValueError(
                "fit: lr_decays must be >= 0 and patience, decay_patience >= 1; got "
                f"{lr_decays}, {patience}, {decay_patience}."
            )
        epochs = range(max_epochs) if max_epochs is not None else _count()
        if progress:
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, desc="ForwardKL epochs")
        history = {
            "train_loss": [],
            "validation_loss": [],
            "best_epoch": -1,
            "epochs": 0,
            "decay_epochs": [],
        }
        best, best_state, stale = math.inf, None, 0
        rate = LearningRateFactor(svi.optim)
        rate.set(1.0)  # a second fit starts from the configured rates again
        for epoch in epochs:
            losses = [svi.step(*args, **kwargs) for _ in range(self.bank.batches_per_epoch)]
            val = self.validation_loss(svi.model, svi.guide, *args, **kwargs)
            history["train_loss"].append(sum(losses) / len(losses))
            history["validation_loss"].append(val)
            history["epochs"] = epoch + 1
            if progress:
                epochs.set_postfix(train=history["train_loss"][-1], validation=val)
            if val < best:
                best, stale, history["best_epoch"] = val, 0, epoch
                best_state = _snapshot(svi.guide)
                continue
            stale += 1
            if stale < patience:
                continue
            if len(history["decay_epochs"]) >= lr_decays or not rate.controls:
                break
            rate.set(lr_factor ** (len(history["decay_epochs"]) + 1))
            # Go on from the best guide with smaller steps.
            _restore(svi.guide, best_state)
            history["decay_epochs"].append(epoch)
            stale, patience = 0, decay_patience
        if best_state is not None:
            _restore(svi.guide, best_state)
        return history

    def _fit_fresh(self, svi, args, kwargs, num_steps, seconds, anneal, progress):
        if num_steps is None and seconds is None:
            raise ValueError(
                "fit: with fresh simulations (no bank) give a budget, num_steps or seconds."
            )
        if (num_steps is not None and num_steps < 1) or (seconds is not None and seconds <= 0):
            raise ValueError(
                f"fit: num_steps must be >= 1 and seconds > 0; got {num_steps}, {seconds}."
            )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_steps, desc="ForwardKL steps")
        history = {"train_loss": [], "steps": 0, "simulations": 0, "seconds": 0.0}
        start = time.perf_counter()
        rate = LearningRateFactor(svi.optim)
        rate.set(1.0)  # a second fit starts from the configured rates again
        while True:
            spent = _budget_spent(history["steps"], num_steps, time.perf_counter() - start, seconds)
            if spent >= 1:
                break
            # The torch optimizers exist from the first step on (Pyro creates them lazily).
            if anneal and history["steps"] > 0:
                rate.set(max(0.5 * (1 + math.cos(math.pi * spent)), _FINAL_RATE))
            history["train_loss"].append(svi.step(*args, **kwargs))
            history["steps"] += 1
            if bar is not None:
                bar.update()
                bar.set_postfix(train=history["train_loss"][-1])
        if bar is not None:
            bar.close()
        history["simulations"] = history["steps"] * self.num_particles
        history["seconds"] = time.perf_counter() - start
        return history


# ---------------------------------------------------------------------------------------------
# Simulation banks


def simulate(
    model,
    *args,
    num_simulations,
    batch_size=None,
    vectorize=True,
    max_plate_nesting=None,
    progress=False,
    **kwargs,
):
    """Simulate a bank of pairs ``(z, x) ~ p(z, x)`` from ``model`` (observed sites released).

    :param model: a Pyro model; ``args``/``kwargs`` as for training (they fix plate sizes).
    :param int num_simulations: number of pairs to keep.
    :param int batch_size: pairs per vectorized model run (default: all at once).
    :param bool vectorize: run the model in a plate over simulations (default); ``False``
        runs it once per pair (for models with Python control flow on sampled values).
    :param int max_plate_nesting: the model's plate depth (found from one run if omitted).
    :param bool progress: show a tqdm progress bar.
    :returns: ``{"latents": {site: tensor}, "observations": {site: tensor},
        "num_invalid": int}``; every tensor has the simulations along dim 0 (the layout of
        a plate over simulations at dim ``-max_plate_nesting - 1``). Invalid draws (see
        ``Implicit(on_invalid="drop")``) are dropped and counted. Plain tensors: save with
        ``torch.save`` and load with ``torch.load(..., weights_only=True)``.
    """
    if num_simulations < 1:
        raise ValueError(f"num_simulations must be positive, got {num_simulations}.")
    loss = ForwardKL(num_particles=1, max_plate_nesting=max_plate_nesting or math.inf)
    loss._warned.add("params")  # simulating trains nothing: no warning about model parameters
    loss._setup(model, args, kwargs)
    loss._pad_unbatched = True
    batch_size = batch_size or num_simulations
    latents, sims, num_invalid, kept = {}, {}, 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_simulations, desc="simulate")
    while kept < num_simulations:
        num = min(batch_size, num_simulations - kept) if vectorize else 1
        z, x, invalid, _ = loss._simulate(model, args, kwargs, num if vectorize else None)
        if invalid is not None:
            num_invalid += int(invalid.sum())
            z = {k: v[~invalid] for k, v in z.items()}
            x = {k: v[~invalid] for k, v in x.items()}
        for store, batch in ((latents, z), (sims, x)):
            for k, v in batch.items():
                store.setdefault(k, []).append(v)
        added = next(iter(x.values())).shape[0]
        kept += added
        if bar is not None:
            bar.update(added)
        if num_invalid > 10 * num_simulations:
            raise NonFiniteError(
                f"simulate: {num_invalid} invalid simulations for {kept} valid ones; the "
                "simulator fails on most of the prior. Restrict the prior."
            )
    if bar is not None:
        bar.close()
    if num_invalid:
        warnings.warn(
            f"simulate dropped {num_invalid} invalid simulations (kept {num_simulations}).",
            UserWarning,
            stacklevel=2,
        )
    return {
        "latents": {k: torch.cat(v)[:num_simulations] for k, v in latents.items()},
        "observations": {k: torch.cat(v)[:num_simulations] for k, v in sims.items()},
        "num_invalid": num_invalid,
    }


class SimulationBank:
    """A bank of simulated pairs split into training and validation parts, served in
    shuffled minibatches (an epoch is one pass over the training split)."""

    def __init__(self, simulations, validation_fraction, batch_size, generator=None):
        try:
            self.latents = dict(simulations["latents"])
            self.observations = dict(simulations["observations"])
        except (KeyError, TypeError) as e:
            raise ValueError(
                "simulations must be a bank from pyro_jc.simulate: a dict with 'latents' and "
                "'observations' (dicts of tensors with simulations along dim 0)."
            ) from e
        sizes = {k: v.shape[0] for k, v in {**self.latents, **self.observations}.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"Bank tensors disagree on the number of simulations: {sizes}.")
        n = next(iter(sizes.values()))
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
        num_val = int(round(validation_fraction * n))
        if validation_fraction > 0 and (num_val == 0 or num_val == n):
            raise ValueError(
                f"A bank of {n} simulations is too small for validation_fraction="
                f"{validation_fraction}."
            )
        self.generator = generator
        perm = torch.randperm(n, generator=generator)
        self.validation_index = perm[:num_val]
        self.train_index = perm[num_val:]
        self.batch_size = min(batch_size, len(self.train_index))
        self.batches_per_epoch = max(1, len(self.train_index) // self.batch_size)
        self._order = None
        self._position = 0

    def _take(self, index):
        return (
            {k: v[index] for k, v in self.latents.items()},
            {k: v[index] for k, v in self.observations.items()},
        )

    def next_batch(self):
        if self._order is None or self._position + self.batch_size > len(self._order):
            perm = torch.randperm(len(self.train_index), generator=self.generator)
            self._order = self.train_index[perm]
            self._position = 0
        index = self._order[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        return self._take(index)

    def training_split(self):
        return self._take(self.train_index)

    def validation_batches(self):
        if len(self.validation_index) == 0:
            raise ValueError("The bank has no validation split (validation_fraction=0).")
        for start in range(0, len(self.validation_index), self.batch_size):
            yield self._take(self.validation_index[start : start + self.batch_size])


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


#: The annealed learning rate ends at this fraction of its initial value.
_FINAL_RATE = 1e-3


def _budget_spent(steps, num_steps, elapsed, seconds):
    """The share of a fresh-simulation budget spent: the larger of the two, where given."""
    shares = [0.0]
    if num_steps is not None:
        shares.append(steps / num_steps)
    if seconds is not None:
        shares.append(elapsed / seconds)
    return max(shares)


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


def _with_simulation_dim(value, site, max_plate_nesting):
    batch_dims = value.dim() - len(site["fn"].event_shape)
    return value.reshape((1,) * (max_plate_nesting + 1 - batch_dims) + value.shape)


def _device_of(values):
    return next(iter(values.values())).device


def _count():
    n = 0
    while True:
        yield n
        n += 1


def _snapshot(guide):
    state = {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}
    module = copy.deepcopy(guide.state_dict()) if isinstance(guide, torch.nn.Module) else None
    return state, module


def _restore(guide, snapshot):
    state, module = snapshot
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, p in store.named_parameters():
            if name in state:
                p.copy_(state[name])
    if module is not None:
        guide.load_state_dict(module)


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
