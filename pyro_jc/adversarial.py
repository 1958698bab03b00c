"""Adversarial density-ratio loss: inference when prior, likelihood and guide are implicit.

A discriminator ``T(z, x)`` (a logit) is trained by logistic regression to tell pairs of the
guide joint (data ``x``, ``z ~ q(z | x)``) from pairs of the model joint (``(z, x) ~ p``);
its Bayes-optimal value is the log density ratio ``log q(z|x) k(x) - log p(z, x)``, whose
expectation under the guide joint is the joint-contrastive KL (see the documentation's
theory page). The guide then minimizes ``E_qk[T]`` through its reparameterized samples with
``T`` held fixed.

Pairs are per datapoint: every latent and observed site sits in the model's data plate, and
``(z_i, x_i)`` is one pair (the amortized setting, ``k`` the empirical data distribution).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.func import functional_call

from .errors import MissingGuideSiteError, UnsupportedModelError
from .joints import (
    check_num_particles,
    data_frames,
    in_plate,
    is_missing_density,
    model_joint_trace,
    sample_sites,
    sum_to_datapoints,
    values_trace,
)
from .layout import ModelLayout
from .nn import MLP, Standardize

_DIVERGENCES = ("kl", "js")


class AdversarialELBO(ELBO):
    r"""Adversarial joint-contrastive loss: a discriminator estimates the log ratio of the
    guide joint to the model joint, so that neither the model's prior and likelihood nor the
    guide needs a density. Use it as the loss of :class:`~pyro.infer.SVI` with an ordinary
    guide::

        guide = encoder                        # z_i = net(x_i, noise): no density needed
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), AdversarialELBO())

    The loss owns the discriminator and its optimizer (not Pyro parameters: SVI does not
    capture them, and the guide's backward pass gives them no gradient). Each
    :meth:`loss_and_grads` (one SVI step) runs ``discriminator_steps`` logistic-regression
    steps of the discriminator (label 1: data ``x`` with ``z ~ q(z | x)``; label 0: fresh
    simulations from the model), ``warmup_steps`` more before the first guide step, then
    back-propagates the guide loss ``N * mean_i T(z_i, x_i)`` (``"kl"``) or
    ``N * mean_i softplus(T)`` (``"js"``, the non-saturating ALI/BiGAN form) through the
    guide's reparameterized draws with the discriminator's parameters held fixed. ``N`` is
    the data plate's full size, as for the ELBO; ``num_particles`` guide draws per datapoint
    are averaged (drawn one guide run at a time, whatever ``vectorize_particles``).
    :meth:`loss` (and so ``svi.evaluate_loss``) evaluates with the current discriminator
    and trains nothing; :meth:`train_discriminator` trains it alone (the guide held fixed).

    With ``"kl"`` the value estimates the joint KL :math:`\mathrm{KL}[q(z|x)k(x) \| p(z,x)]`
    (the data entropy included, through the moment-matched ``log k(x)`` below), whose fixed
    point is the KL projection of the posterior on the guide family (for a mean-field
    Gaussian guide: the reverse-KL mean-field optimum); with ``"js"`` it is the
    Jensen-Shannon projection, which differs for restricted families.

    **Residual ratio.** With ``residual=True`` the discriminator's logit is
    ``T = r_known + r_gauss + net(z, x)``, where ``r_known`` adds the log densities that
    exist (``log q(z|x)`` of an explicit guide, ``-log p(z)`` of an explicit prior,
    ``-log p(x|z)`` of an explicit likelihood) and ``r_gauss`` is the log ratio of Gaussians
    moment-matched to the two sets of pairs for the remaining terms (always ``log k(x)``; the
    implicit ones of the three above). The network, zero at initialization, learns only the
    remainder: a plain network underestimates large KLs badly.

    **Model parameters.** Explicit sites' parameters get ``-E_qk[grad log p]`` from the
    residual's known densities; a differentiable simulator's parameters
    (``Implicit(..., reparameterized=True)``) get the dual gradient ``-grad E_p[exp T]``
    (``"js"``: ``-grad E_p[softplus T]``) through fresh simulations with ``T`` held fixed.

    :meth:`state_dict` and :meth:`load_state_dict` save and restore the discriminator and
    its optimizer (plain tensors: ``torch.save`` and ``torch.load(..., weights_only=True)``).

    :param int num_particles: guide draws per datapoint and step.
    :param max_plate_nesting: accepted for Pyro's interface (the pairs are per datapoint).
    :param bool vectorize_particles: accepted for Pyro's interface (see above).
    :param nn.Module discriminator: network from ``(..., features)`` standardized pair
        features (latents, then observations, flattened per datapoint) to a logit
        ``(..., 1)``. Default: an MLP with ``hidden_dims`` and LeakyReLU, zero-initialized
        output, sized from the sites.
    :param str divergence: ``"kl"`` (default) or ``"js"``.
    :param int discriminator_steps: discriminator steps per SVI step.
    :param int warmup_steps: extra discriminator steps before the first guide step.
    :param float learning_rate: Adam learning rate of the discriminator.
    :param bool residual: add the known and Gaussian log ratios to the network's output.
    :param hidden_dims: hidden widths of the default discriminator.
    :param observations: how the simulated observations reach the guide (see
        :class:`~pyro_jc.joints.ObservationArguments`); needed for ``r_known`` of an
        explicit guide at model pairs. Found automatically by default.

    **References**

    * Donahue, Kraehenbuehl, Darrell (2017), *Adversarial feature learning* (BiGAN).
    * Dumoulin et al. (2017), *Adversarially learned inference* (ALI).
    * Mescheder, Nowozin, Geiger (2017), *Adversarial variational Bayes*.
    * Huszar (2017), *Variational inference using implicit distributions*.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = math.inf,
        vectorize_particles: bool = False,
        *,
        discriminator: nn.Module | None = None,
        divergence: str = "kl",
        discriminator_steps: int = 1,
        warmup_steps: int = 200,
        learning_rate: float = 1e-3,
        residual: bool = True,
        hidden_dims: Sequence[int] = (128, 128, 128),
        observations: dict | Callable | None = None,
    ) -> None:
        check_num_particles(num_particles)
        if divergence not in _DIVERGENCES:
            raise ValueError(f"divergence must be one of {_DIVERGENCES}, got {divergence!r}.")
        if discriminator_steps < 1 or warmup_steps < 0:
            raise ValueError("discriminator_steps must be >= 1 and warmup_steps >= 0.")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        self.divergence = divergence
        self.discriminator_steps = discriminator_steps
        self.warmup_steps = warmup_steps
        self.learning_rate = learning_rate
        self.residual = residual
        self.hidden_dims = tuple(hidden_dims)
        self._discriminator_arg = discriminator
        self._observations = observations
        self._model = None
        self.discriminator = None
        self.optimizer = None
        self._pending_state = None
        self.num_guide_steps = 0
        # Since the last health check: sum and count of E_p[exp T], and the held-out gaps.
        self._exp_t_window = [0.0, 0]
        self._gap_window = []
        #: Diagnostics of the last call: ``kl`` (plug-in E_qk[T] per datapoint) and, after a
        #: discriminator step, its ``accuracy``, ``exp_t_model`` (E_p[exp T], near 1 when the
        #: ratio is right), ``discriminator_loss`` and ``held_out_gap`` (T on the pairs of
        #: the last discriminator step minus on fresh draws of z for the same data, paired
        #: by datapoint; ``held_out_gap_se``).
        self.diagnostics = {}

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("AdversarialELBO contrasts pairs; it has no per-trace ELBO.")

    # -- public interface -------------------------------------------------------------------

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Estimate the divergence with the current discriminator; trains nothing (the
        discriminator is built, untrained, on the first call).

        :returns: ``N * mean_i T(z_i, x_i)`` (``"kl"``) or ``N * mean_i softplus(T)``.
        :rtype: float
        """
        with torch.no_grad():
            return self._step(model, guide, args, kwargs, train=False).item()

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Train the discriminator (as a step does), then return the guide's differentiable
        loss, for training loops that call ``backward`` themselves.

        :rtype: torch.Tensor
        """
        return self._step(model, guide, args, kwargs, train=True)

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Train the discriminator, then back-propagate the guide loss into the guide's (and
        the model's) parameters.

        :returns: the divergence estimate.
        :rtype: float
        """
        loss = self._step(model, guide, args, kwargs, train=True)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()

    def train_discriminator(
        self, model: Callable, guide: Callable, *args: Any, num_steps: int = 1, **kwargs: Any
    ) -> dict:
        """Run ``num_steps`` discriminator steps with the guide held fixed (a warm-up, or the
        ratio of a frozen guide).

        :returns: :attr:`diagnostics` after the last step.
        :rtype: dict
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        self._set_up(model, guide, args, kwargs)
        for _ in range(num_steps):
            self._discriminator_step(model, guide, args, kwargs)
        return dict(self.diagnostics)

    def state_dict(self) -> dict:
        """Everything the discriminator's training carries from step to step: the network's
        and its optimizer's state, the feature standardization, the running moments of the
        residual ratio, the health checks' windows and the step count. Tensors, numbers and
        containers only (``torch.load(..., weights_only=True)`` reads them)."""
        net, opt = self.discriminator, self.optimizer
        built = net is not None
        state = {
            "discriminator": net.state_dict() if built else None,
            "optimizer": opt.state_dict() if built else None,
            "standardize": self.standardize.state_dict() if built else None,
            "moments": _plain_moments(self._moments) if built else None,
            "initial_moments": _plain_moments(self._initial_moments) if built else None,
            "exp_t_window": list(self._exp_t_window),
            "gap_window": list(self._gap_window),
            "num_guide_steps": self.num_guide_steps,
        }
        # A copy: torch's state dicts share the tensors that later steps update in place.
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the discriminator is built on the next step (from the
        model's sites) if it does not exist yet, then loaded."""
        self._pending_state = state
        self.num_guide_steps = state["num_guide_steps"]
        self._exp_t_window = list(state.get("exp_t_window", [0.0, 0]))
        self._gap_window = list(state.get("gap_window", []))
        if self.discriminator is not None:
            self._load_pending()

    # -- one SVI step ---------------------------------------------------------------------

    def _set_up(self, model, guide, args, kwargs):
        if self._model is None:
            self._setup(model, guide, args, kwargs)
            self._model = model
        elif self._model != model:  # (a bound method is a new object at each access)
            raise ValueError(
                "This AdversarialELBO's discriminator was built for another model; use one "
                "AdversarialELBO per model."
            )

    def _step(self, model, guide, args, kwargs, train):
        self._set_up(model, guide, args, kwargs)
        trained_on = None
        if train:
            warmup = self.warmup_steps if self.num_guide_steps == 0 else 0
            steps = warmup + self.discriminator_steps
            for i in range(steps):
                trained_on = self._discriminator_step(
                    model, guide, args, kwargs, last=i == steps - 1
                )
        logits = [
            self._logit(self._guide_pairs(model, guide, args, kwargs), frozen=True)
            for _ in range(self.num_particles)
        ]
        logit = torch.cat(logits)
        with torch.no_grad():
            self.diagnostics["kl"] = logit.mean().item()
            if trained_on is not None:
                # Paired by datapoint: both sets of pairs share the data and differ in z.
                gap = trained_on - logits[0]
                self.diagnostics["held_out_gap"] = gap.mean().item()
                self.diagnostics["held_out_gap_se"] = (gap.var() / gap.numel()).sqrt().item()
                self._gap_window.append(self.diagnostics["held_out_gap"])
        per_pair = logit if self.divergence == "kl" else nn.functional.softplus(logit)
        loss = self._num_datapoints * per_pair.mean()
        if not train:
            return loss
        self._warn_if_unhealthy()
        self.num_guide_steps += 1
        if torch.is_grad_enabled() and self._dual_sites is not False:
            loss = loss + self._model_gradient_surrogate(model, guide, args, kwargs)
        return loss

    @torch.enable_grad()
    def _discriminator_step(self, model, guide, args, kwargs, last=False):
        with torch.no_grad():
            guide_pairs = self._guide_pairs(model, guide, args, kwargs)
            model_pairs = self._model_pairs(model, guide, args, kwargs)
            self._update_moments(guide_pairs, model_pairs)
        t_q = self._logit(guide_pairs)
        t_p = self._logit(model_pairs)
        loss = nn.functional.softplus(-t_q).mean() + nn.functional.softplus(t_p).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.diagnostics["accuracy"] = 0.5 * (
                (t_q > 0).float().mean().item() + (t_p < 0).float().mean().item()
            )
            self.diagnostics["exp_t_model"] = t_p.clamp(max=50).exp().mean().item()
            self._exp_t_window[0] += self.diagnostics["exp_t_model"]
            self._exp_t_window[1] += 1
            self.diagnostics["num_pairs"] = t_p.numel()
            self.diagnostics["discriminator_loss"] = loss.item()
        if not last:
            return None
        # The updated discriminator on the pairs it was just trained on: compared with fresh
        # pairs (same data, new draws of z), an excess is overfitting to those pairs.
        with torch.no_grad():
            return self._logit(guide_pairs)

    # -- setup ----------------------------------------------------------------------------

    def _setup(self, model, guide, args, kwargs):
        # With gradients on, so that the sites' parameters show whether they are learnable.
        layout = ModelLayout(model, args, kwargs, observations=self._observations)
        layout.check_observed_shapes()
        trace, frame = layout.trace, layout.data_plate
        latents = [trace.nodes[name] for name in layout.latent_sites]
        observed = [trace.nodes[name] for name in layout.observed_sites]
        if frame is None:
            raise ValueError(
                "AdversarialELBO contrasts per-datapoint pairs (z_i, x_i), so the model needs "
                "a data plate (pyro.plate around its observed sites)."
            )
        for site in latents + observed:
            if not in_plate(site, frame):
                raise UnsupportedModelError(
                    f"Site {site['name']!r} is outside the data plate {frame.name!r}. "
                    "AdversarialELBO needs every latent and observed site in the data plate "
                    "(one pair (z_i, x_i) per datapoint); global latents are not supported."
                )
            others = [f.name for f in data_frames(site) if f != frame]
            if others:
                raise UnsupportedModelError(
                    f"Site {site['name']!r} is in plates {others} besides the data plate "
                    f"{frame.name!r}; give it an event shape (.to_event) instead."
                )
        self._frame = frame
        self._num_datapoints = layout.num_datapoints
        self._latents = layout.latent_sites
        self._observed = layout.observed_sites
        self._layout = layout
        layout.locations  # noqa: B018  (fails early when the data argument is ambiguous)
        with torch.no_grad():
            features = self._guide_pairs(model, guide, args, kwargs, explicit=False)["features"]
            model_pairs = self._model_pairs(model, guide, args, kwargs, explicit=False)
        self._z_dim = model_pairs["z_dim"]
        device, dtype = features.device, features.dtype
        self.standardize = Standardize(
            features.shape[-1], what="the discriminator's inputs (latents and observations)"
        ).to(device=device, dtype=dtype)
        self.standardize.fit(model_pairs["features"])
        self.discriminator = self._build_discriminator(features.shape[-1]).to(
            device=device, dtype=dtype
        )
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.learning_rate)
        self._moments = None
        # Moments of the set-up's pairs: the residual's Gaussians until the first
        # discriminator step sets the running moments (an evaluation before any training).
        self._update_moments({"features": features}, model_pairs)
        self._initial_moments, self._moments = self._moments, None
        self._guide_has_density = None
        self._implicit = {
            n for n in self._latents + self._observed if self._log_density(trace, [n]) is None
        }
        self._dual_sites = self._learnable_implicit_sites(trace) or False
        self._dual_layout_checked = False
        if self._pending_state is not None:
            self._load_pending()

    def _build_discriminator(self, in_dim):
        if self._discriminator_arg is not None:
            return self._discriminator_arg
        net = MLP(in_dim, self.hidden_dims, 1, activation=nn.LeakyReLU)
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        return net

    def _load_pending(self):
        state = self._pending_state
        if state["discriminator"] is not None:
            self.discriminator.load_state_dict(state["discriminator"])
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("standardize") is not None:
            self.standardize.load_state_dict(state["standardize"])
        if state.get("initial_moments") is not None:
            self._initial_moments = _tuple_moments(state["initial_moments"])
            self._moments = _tuple_moments(state["moments"])
        self._pending_state = None

    # -- pairs ----------------------------------------------------------------------------

    def _guide_pairs(self, model, guide, args, kwargs, explicit=True):
        """``x`` = data, ``z ~ q(z | x)``; with the known log densities of the pair."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        self._check_guide(guide_trace)
        values = {n: guide_trace.nodes[n]["value"] for n in self._latents}
        values.update({n: model_trace.nodes[n]["value"] for n in self._observed})
        pairs = self._features(values, model_trace)
        if explicit and self.residual:
            pairs["log_q"] = self._log_density(guide_trace, self._latents)
            pairs["log_prior"] = self._log_density(model_trace, self._latents)
            pairs["log_lik"] = self._log_density(model_trace, self._observed)
        return pairs

    def _model_pairs(self, model, guide, args, kwargs, explicit=True):
        """``(z, x) ~ p``, fresh simulations of a data set of the data's size."""
        trace = model_joint_trace(model, args, kwargs)
        values = {n: trace.nodes[n]["value"] for n in self._latents + self._observed}
        pairs = self._features(values, trace)
        if explicit and self.residual:
            pairs["log_prior"] = self._log_density(trace, self._latents)
            pairs["log_lik"] = self._log_density(trace, self._observed)
            # An implicit guide is found out once; it is not run again just to fail.
            if self._guide_has_density is not False:
                pairs["log_q"] = self._guide_density_at(guide, trace, args, kwargs)
                self._guide_has_density = pairs["log_q"] is not None
        return pairs

    def _guide_density_at(self, guide, model_trace, args, kwargs):
        """``log q(z | x)`` at model pairs: the simulated ``x`` passed to the guide, the
        simulated ``z`` replayed (``None`` for an implicit guide)."""
        sims = {n: model_trace.nodes[n]["value"] for n in self._observed}
        sim_args, sim_kwargs = self._layout.substitute(sims, args, kwargs)
        latents = values_trace({n: model_trace.nodes[n]["value"] for n in self._latents})
        guide_trace = poutine.trace(poutine.replay(guide, trace=latents)).get_trace(
            *sim_args, **sim_kwargs
        )
        return self._log_density(guide_trace, self._latents)

    def _features(self, values, trace):
        z = [self._per_datapoint(values[n], trace.nodes[n]) for n in self._latents]
        x = [self._per_datapoint(values[n], trace.nodes[n]) for n in self._observed]
        return {"features": torch.cat(z + x, -1), "z_dim": sum(t.shape[-1] for t in z)}

    def _per_datapoint(self, value, site):
        event_dim = len(site["fn"].event_shape)
        dim = value.dim() - event_dim + self._frame.dim
        if dim < 0:  # broadcast along the data plate
            value = value.reshape((1,) * -dim + value.shape)
            dim = 0
        value = value.movedim(dim, 0)
        if not value.is_floating_point():  # counts, categories
            value = value.to(torch.get_default_dtype())
        n = max(value.shape[0], self._frame.size)
        return value.expand((n,) + value.shape[1:]).reshape(n, -1)

    def _log_density(self, trace, names):
        """Per-datapoint sum of the sites' log densities, or ``None`` if one is implicit."""
        total = 0.0
        for name in names:
            site = trace.nodes[name]
            try:
                log_p = site["fn"].log_prob(site["value"])
            except (NotImplementedError, ValueError) as e:
                if not is_missing_density(e):
                    raise
                return None
            total = total + sum_to_datapoints(log_p, site, self._frame)
        return total

    def _check_guide(self, guide_trace):
        names = {s["name"] for s in sample_sites(guide_trace)}
        missing = [n for n in self._latents if n not in names]
        if missing:
            raise MissingGuideSiteError(
                f"Latent sites {missing} are sampled in the model but not in the guide: the "
                "adversarial guide needs z for every latent. Add them to the guide."
            )
        for name in self._latents:
            site = guide_trace.nodes[name]
            if not site["fn"].has_rsample:
                raise ValueError(
                    f"Guide site {name!r} is not reparameterized ({type(site['fn']).__name__}), "
                    "so the guide loss E_qk[T] has no pathwise gradient. Use a reparameterized "
                    "distribution, or an Implicit(..., reparameterized=True) noise-fed network."
                )

    # -- model parameters of implicit sites ----------------------------------------------

    def _model_gradient_surrogate(self, model, guide, args, kwargs):
        """A zero-valued term whose gradient is the model parameters' share of the divergence
        gradient that flows through implicit sites.

        ``E_qk[T]`` gives model parameters no gradient through an implicit site (``T`` is
        fixed and the guide pairs do not depend on them). The dual form does: at the optimal
        ratio, ``grad KL[qk || p] = -grad E_p[exp T]`` (``"kl"``) and
        ``grad JS = -grad E_p[softplus T]`` (``"js"``), differentiated through the model's
        reparameterized simulations with ``T`` held fixed. Explicit sites' values are cut
        (their parameters already get the exact gradient of their log densities through the
        guide pairs), so only the implicit sites' paths carry this term.
        """
        explicit = [n for n in self._latents + self._observed if n not in self._implicit]
        trace = model_joint_trace(_DetachSites(explicit)(model), args, kwargs)
        values = {n: trace.nodes[n]["value"] for n in self._latents + self._observed}
        values.update({n: values[n].detach() for n in explicit})
        if not self._dual_layout_checked:
            self._check_dual_layout(trace, values, explicit)
            self._dual_layout_checked = True
        pairs = self._features(values, trace)
        if self.residual:
            pairs["log_prior"] = self._log_density(trace, self._latents)
            pairs["log_lik"] = self._log_density(trace, self._observed)
            if self._guide_has_density:
                pairs["log_q"] = self._guide_density_at(guide, trace, args, kwargs)
        logit = self._logit(pairs, frozen=True)
        if self.divergence == "kl":
            # exp(T) beyond e^50 is a pair the ratio cannot be trusted on anyway.
            dual = -logit.clamp(max=50.0).exp()
        else:
            dual = -nn.functional.softplus(logit)
        sites = [values[n] for n in self._dual_sites]
        grads = torch.autograd.grad(dual.sum(), sites, retain_graph=True)
        scale = self._num_datapoints / dual.numel()
        surrogate = sum((g * (v - v.detach())).sum() for g, v in zip(grads, sites, strict=True))
        return scale * surrogate

    def _learnable_implicit_sites(self, trace):
        """Implicit sites whose simulator parameters are learnable and reparameterized (the
        dual gradient reaches them); a warning for those that are not reparameterized."""
        sites = []
        for name in self._latents + self._observed:
            fn = trace.nodes[name]["fn"]
            if name not in self._implicit or not _params_require_grad(fn):
                continue
            if fn.has_rsample:
                sites.append(name)
            else:
                warnings.warn(
                    f"AdversarialELBO: implicit site {name!r} depends on learnable parameters "
                    "but is not reparameterized, so they get no gradient. Declare "
                    "Implicit(..., reparameterized=True) if the simulator is a differentiable "
                    "torch function.",
                    RuntimeWarning,
                    stacklevel=6,
                )
        return sites

    def _check_dual_layout(self, trace, values, explicit):
        """Refuse explicit sites downstream of a learnable simulation: the dual term cuts
        explicit values, which would cut that path too."""
        sims = [values[n] for n in self._dual_sites]
        for name in explicit:
            log_p = trace.nodes[name]["fn"].log_prob(values[name])
            if not log_p.requires_grad:
                continue
            grads = torch.autograd.grad(log_p.sum(), sims, retain_graph=True, allow_unused=True)
            if any(g is not None for g in grads):
                raise UnsupportedModelError(
                    f"Explicit site {name!r} depends on the implicit, learnable simulation(s) "
                    f"{self._dual_sites}: AdversarialELBO learns simulator parameters only when "
                    "explicit sites do not sit downstream of implicit ones. Make the downstream "
                    "site implicit too (Implicit(..., reparameterized=True))."
                )

    # -- the logit ------------------------------------------------------------------------

    def _update_moments(self, guide_pairs, model_pairs, momentum=0.95):
        """Running moments of both sets of standardized pairs, for the Gaussian ratio."""
        if not self.residual:
            return
        new = {
            "q": _moments(self.standardize(guide_pairs["features"])),
            "p": _moments(self.standardize(model_pairs["features"])),
        }
        if self._moments is None:
            self._moments = new
            return
        for side, (mean, cov) in new.items():
            old_mean, old_cov = self._moments[side]
            self._moments[side] = (
                momentum * old_mean + (1 - momentum) * mean,
                momentum * old_cov + (1 - momentum) * cov,
            )

    def _logit(self, pairs, frozen=False):
        f = self.standardize(pairs["features"])
        if frozen:  # the guide step: no gradient into the discriminator
            params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            net = functional_call(self.discriminator, params, (f,))
        else:
            net = self.discriminator(f)
        logit = net.squeeze(-1)
        if self.residual:
            logit = logit + self._residual(pairs, f)
        return logit

    def _residual(self, pairs, f):
        """Known log densities plus moment-matched Gaussian log densities for the unknown
        ones, all in the units of the data."""
        moments = self._initial_moments if self._moments is None else self._moments
        gauss = _GaussianTerms(moments, f, self._z_dim, self.standardize.std.log())
        r = gauss.log_q_x()  # log k(x): never known
        log_q, log_prior, log_lik = pairs.get("log_q"), pairs.get("log_prior"), pairs.get("log_lik")
        r = r + (log_q if log_q is not None else gauss.log_q_z_given_x())
        r = r - (log_prior if log_prior is not None else gauss.log_p_z())
        r = r - (log_lik if log_lik is not None else gauss.log_p_x_given_z())
        return r

    def _warn_if_unhealthy(self):
        # Every 100 steps: the two self-consistency checks of a ratio estimate. (A high
        # accuracy alone is no fault: it is what a large KL looks like.)
        d = self.diagnostics
        if self.num_guide_steps % 100 != 99:
            return
        if self.num_guide_steps < 100:
            # The first window is a transient (the guide moves fastest and the ratio lags):
            # judge from the second on.
            self._exp_t_window, self._gap_window = [0.0, 0], []
            return
        # E_p[exp T] is heavy-tailed: judge its mean over every discriminator step since the
        # last check, not one batch. From n model pairs it is only estimable while the KL is
        # below about log n.
        total, count = self._exp_t_window
        self._exp_t_window = [0.0, 0]
        exp_t = total / count if count else 1.0
        estimable = d.get("kl", 0.0) < math.log(d.get("num_pairs", 1) * max(count, 1))
        if estimable and not 0.5 < exp_t < 2.0:
            warnings.warn(
                f"AdversarialELBO: E_p[exp T] = {exp_t:.3g} over the last {count} "
                "discriminator steps, far from 1: the estimated ratio "
                "is off. Use the residual ratio (residual=True), more discriminator_steps or "
                "warmup_steps, or a lower learning rate for the guide.",
                RuntimeWarning,
                stacklevel=4,
            )
        # The mean held-out gap of the steps since the last check, against its standard error
        # across those steps (a single step's gap is too noisy to act on).
        gaps, self._gap_window = torch.tensor(self._gap_window), []
        if len(gaps) < 2:
            return
        gap, se = gaps.mean().item(), (gaps.var() / len(gaps)).sqrt().item()
        if gap > 4 * se + 0.01:
            warnings.warn(
                f"AdversarialELBO: E_qk[T] is {gap:+.3g} higher on the pairs the "
                f"discriminator was just trained on than on fresh draws of z (mean of "
                f"{len(gaps)} steps): it is overfitting. Use more data per step, fewer "
                "discriminator steps or a smaller discriminator.",
                RuntimeWarning,
                stacklevel=4,
            )


class _DetachSites(Messenger):
    """Cut the gradient of the named sites' sampled values (seen by the rest of the model)."""

    def __init__(self, names):
        super().__init__()
        self.names = set(names)

    def _postprocess_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.names:
            msg["value"] = msg["value"].detach()


def _params_require_grad(fn):
    while fn is not None:
        if any(getattr(p, "requires_grad", False) for p in getattr(fn, "params", ())):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def _plain_moments(moments):
    """Running moments ``{side: (mean, cov)}`` as plain containers (or ``None``)."""
    return None if moments is None else {k: list(v) for k, v in moments.items()}


def _tuple_moments(moments):
    return None if moments is None else {k: tuple(v) for k, v in moments.items()}


def _moments(f):
    mean = f.mean(0)
    centered = f - mean
    cov = centered.T @ centered / max(f.shape[0] - 1, 1)
    return mean, cov


class _GaussianTerms:
    """Log densities of Gaussians moment-matched to the guide pairs (``q``) and the model
    pairs (``p``) over standardized features ``[z, x]`` (``z`` the first ``k``), in the
    units of the unstandardized features."""

    def __init__(self, moments, f, k, log_std, jitter=1e-4):
        self.f, self.k, self.log_std, self.jitter = f, k, log_std, jitter
        self.moments = moments

    def _log_normal(self, side, block):
        mean, cov = self.moments[side]
        m, c = mean[block], cov[block, block]
        c = c + self.jitter * torch.eye(c.shape[-1], device=c.device, dtype=c.dtype)
        normal = pyro.distributions.MultivariateNormal(m, covariance_matrix=c)
        return normal.log_prob(self.f[..., block]) - self.log_std[block].sum()  # data units

    def log_q_x(self):
        return self._log_normal("q", slice(self.k, None))

    def log_q_z_given_x(self):
        return self._log_normal("q", slice(None)) - self.log_q_x()

    def log_p_z(self):
        return self._log_normal("p", slice(None, self.k))

    def log_p_x_given_z(self):
        return self._log_normal("p", slice(None)) - self.log_p_z()
