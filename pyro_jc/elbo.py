"""Reverse KL between the guide joint and the model joint: the joint-contrastive ELBO family.

    KL[q(z|x) k(x) || p(z, x)] = E_k[-ELBO(x)] - H[k]

Gradients equal those of the amortized negative ELBO; the classes here reproduce the
estimators of :class:`~pyro.infer.Trace_ELBO` and
:class:`~pyro.infer.TraceMeanField_ELBO` on the same traces and add what Pyro lacks: the
joint KL itself (given the data entropy), a ``beta`` weight on the rate, and per-datapoint
diagnostics (reconstruction, rate, mutual information, marginal KL).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.elbo import ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import MultiFrameTensor, get_plate_stacks, is_validation_enabled
from torch.distributions import kl_divergence

from .decomposition import information_terms
from .joints import (
    GuideJointTraces,
    check_data_entropy,
    check_num_particles,
    find_data_plate,
    latent_sites,
    num_datapoints,
    observed_sites,
    raise_nonfinite,
    sample_sites,
)


class JointContrastiveELBO(GuideJointTraces, ELBO):
    r"""Joint-contrastive ELBO: the reverse KL between the guide joint :math:`q(z|x)k(x)` and
    the model joint :math:`p(z,x)`,

    .. math::

        \mathrm{KL}[q_\phi(z|x)k(x) \,\|\, p_\theta(z,x)]
            = \mathbb{E}_{k}[-\mathrm{ELBO}(x)] - H[k].

    A drop-in replacement for :class:`~pyro.infer.Trace_ELBO`: on the same traces (same seed)
    it gives the same value and gradients, with the same scaling conventions (``loss`` is the
    sum over the full data set, subsampling scales included), so learning rates carry over.
    It supports ``num_particles``, ``vectorize_particles``, ``max_plate_nesting``, nested
    plates, subsampling, :func:`~pyro.poutine.scale` and :func:`~pyro.poutine.mask`,
    reparameterized guide sites and non-reparameterized (e.g. discrete) ones, whose
    score-function terms are Rao-Blackwellized along plates as in ``Trace_ELBO``.

    After each evaluation, :attr:`diagnostics` holds per-datapoint estimates (nats per
    datapoint, averaged over particles):

    * ``"elbo"``: :math:`\mathbb{E}_k \mathrm{ELBO}(x)`;
    * ``"reconstruction"``: :math:`\mathbb{E}_k\mathbb{E}_q[-\log p(x|z)]`;
    * ``"rate"``: :math:`\mathbb{E}_k \mathrm{KL}[q(z|x)\|p(z)]` (latents outside the data
      plate contribute their KL divided by the number of datapoints);
    * ``"joint_kl"``: the joint KL itself, when ``data_entropy`` is given;
    * ``"mutual_information"`` and ``"marginal_kl"`` (with ``estimate_information=True``):
      :math:`I_q(x;z)` and :math:`\mathrm{KL}[q(z)\|p(z)]`, with ``rate = mutual_information
      + marginal_kl``. They are minibatch estimates of the aggregate posterior
      (:mod:`pyro_jc.decomposition`): biased for small batches (the aggregate posterior is
      estimated from the batch's own encodings, and the estimate of :math:`I_q` can never
      exceed ``log N`` for ``N`` datapoints); use batches of hundreds or more.

    :param int num_particles: number of particles (samples of :math:`z` per datapoint).
    :param max_plate_nesting: bound on the number of nested :class:`~pyro.plate` s;
        guessed from one model run if omitted.
    :param bool vectorize_particles: draw all particles in one vectorized run.
    :param float beta: weight on the rate term, giving the loss
        ``reconstruction + beta * rate`` (as in the beta-VAE). For ``beta != 1`` the value is
        no longer a bound on the evidence nor a KL between the joints.
    :param float data_entropy: entropy :math:`H[k]` of the data distribution, in nats per
        datapoint. When given, ``num_datapoints * data_entropy`` is subtracted from the loss,
        which is then the joint KL summed over the data set (non-negative up to Monte-Carlo
        error when ``H[k]`` is exact). Gradients are unchanged.
    :param str data_plate: name of the plate over datapoints. By default, the outermost
        plate shared by all observed sites; without one, the data set is one datapoint.
    :param bool estimate_information: also estimate the mutual information and marginal KL.
    :param retain_graph: passed to ``backward``, as in Pyro.

    References

    [1] Joint-contrastive inference and model-based deep learning, L. Ambrogioni et al.

    [2] Auto-Encoding Variational Bayes, D. P. Kingma, M. Welling (2014)

    [3] beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework,
    I. Higgins et al. (2017)
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = math.inf,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        jit_options: dict | None = None,
        retain_graph: bool | None = None,
        *,
        beta: float = 1.0,
        data_entropy: float | None = None,
        data_plate: str | None = None,
        estimate_information: bool = False,
    ) -> None:
        check_num_particles(num_particles)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            jit_options=jit_options,
            retain_graph=retain_graph,
        )
        if not beta >= 0:
            raise ValueError(f"beta must be non-negative, got {beta}.")
        self.beta = float(beta)
        self.data_entropy = check_data_entropy(data_entropy)
        self.data_plate = data_plate
        self.estimate_information = estimate_information
        self.diagnostics = {}
        self._warned = set()

    def _rate_terms(self, model_trace, guide_trace):
        """The rate ``sum log q(z|x) - log p(z)`` (detached) and its surrogate (differentiable
        pathwise part). Monte-Carlo here; analytic in the mean-field subclass."""
        rate = 0.0
        surrogate = 0.0
        for site in latent_sites(model_trace):
            rate = rate - site["log_prob_sum"]
            surrogate = surrogate - site["log_prob_sum"]
        for site in sample_sites(guide_trace):
            rate = rate + site["log_prob_sum"]
            entropy_term = site["score_parts"].entropy_term
            if not is_identically_zero(entropy_term):
                surrogate = surrogate + entropy_term.sum()
        return rate, surrogate

    def _score_function_term(self, model_trace, guide_trace):
        """Plate-aware score-function surrogate for non-reparameterized guide sites, with the
        learning signal ``log p(x|z) + beta (log p(z) - log q(z|x))`` as in ``Trace_ELBO``."""
        surrogate = 0.0
        log_r = None
        for site in sample_sites(guide_trace):
            score_function_term = site["score_parts"].score_function
            if is_identically_zero(score_function_term):
                continue
            if log_r is None:
                log_r = self._log_r(model_trace, guide_trace)
            signal = log_r.sum_to(site["cond_indep_stack"])
            surrogate = surrogate + (signal * score_function_term).sum()
        return surrogate

    def _log_r(self, model_trace, guide_trace):
        log_r = MultiFrameTensor()
        stacks = get_plate_stacks(model_trace)
        for site in sample_sites(model_trace):
            term = site["log_prob"]
            if not site["is_observed"]:
                term = self.beta * (term - guide_trace.nodes[site["name"]]["log_prob"])
            log_r.add((stacks[site["name"]], term.detach()))
        return log_r

    def _particle(self, model_trace, guide_trace):
        """Loss terms of one (possibly vectorized) trace pair."""
        reconstruction = 0.0
        for site in observed_sites(model_trace):
            reconstruction = reconstruction - site["log_prob_sum"]
        rate, rate_surrogate = self._rate_terms(model_trace, guide_trace)
        surrogate = (
            reconstruction
            + self.beta * rate_surrogate
            - self._score_function_term(model_trace, guide_trace)
        )
        value = torch.as_tensor(reconstruction + self.beta * rate).detach()
        if not bool(torch.isfinite(value)):
            raise_nonfinite(model_trace, guide_trace, value)

        frame = find_data_plate(model_trace, self.data_plate)
        terms = {
            "value": value,
            "reconstruction": torch.as_tensor(reconstruction).detach(),
            "rate": torch.as_tensor(rate).detach(),
            "num_datapoints": num_datapoints(frame),
        }
        if self.estimate_information:
            info = information_terms(model_trace, guide_trace, frame, self._particle_dim())
            if info is None:
                # The aggregate posterior is estimated on the batch: one datapoint has none.
                if "batch_of_one" not in self._warned:
                    self._warned.add("batch_of_one")
                    warnings.warn(
                        "estimate_information: the mutual information and marginal KL are "
                        "estimated on the batch's datapoints and need at least two in the "
                        f"data plate ({'none' if frame is None else frame.size} here); "
                        "diagnostics['mutual_information'] and ['marginal_kl'] are NaN. "
                        "This warning is shown once.",
                        UserWarning,
                        stacklevel=5,
                    )
                info = (value.new_full((), math.nan), value.new_full((), math.nan))
            terms["mutual_information"], terms["marginal_kl"] = info
        return surrogate, terms

    def _evaluate(self, model, guide, args, kwargs, backward):
        """Run all particles; returns the loss (float) and the surrogate loss (tensor or None
        with ``backward``, which then back-propagates particle by particle)."""
        surrogate_loss = 0.0
        totals = {}
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            surrogate, terms = self._particle(model_trace, guide_trace)
            surrogate = surrogate / self.num_particles
            if backward:
                trainable = any(
                    site["type"] == "param"
                    for trace in (model_trace, guide_trace)
                    for site in trace.nodes.values()
                )
                if trainable and getattr(surrogate, "requires_grad", False):
                    surrogate.backward(retain_graph=self.retain_graph)
            else:
                surrogate_loss = surrogate_loss + surrogate
            for key, term in terms.items():
                totals[key] = totals.get(key, 0.0) + term
        num_traces = 1 if self.vectorize_particles else self.num_particles
        loss = self._record(totals, num_traces)
        return loss, surrogate_loss

    def _record(self, totals, num_traces):
        """Fill :attr:`diagnostics` with one device sync; returns the loss value."""
        n = totals.pop("num_datapoints") / num_traces
        keys = list(totals)
        device = totals["value"].device
        values = torch.stack(
            [torch.as_tensor(totals[k], dtype=torch.float64, device=device) for k in keys]
        )
        values = dict(zip(keys, values.tolist(), strict=True))
        loss = values.pop("value") / self.num_particles
        for key in ("reconstruction", "rate"):
            values[key] /= self.num_particles * n
        for key in ("mutual_information", "marginal_kl"):
            if key in values:
                values[key] /= num_traces
        values["elbo"] = -(values["reconstruction"] + values["rate"])
        if self.data_entropy is not None:
            loss -= n * self.data_entropy
            values["joint_kl"] = -values["elbo"] - self.data_entropy
        values["num_datapoints"] = n
        values["loss"] = loss
        self.diagnostics = values
        return loss

    # -- public interface -----------------------------------------------------------------

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        :returns: an estimate of the loss (the negative ELBO summed over the data set, minus
            ``num_datapoints * data_entropy`` when that is given).
        :rtype: float
        """
        with torch.no_grad():
            loss, _ = self._evaluate(model, guide, args, kwargs, backward=False)
        return loss

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        :returns: a differentiable surrogate whose value is the loss estimate and whose
            gradient is the gradient estimator used by :meth:`loss_and_grads`.
        :rtype: torch.Tensor
        """
        loss, surrogate_loss = self._evaluate(model, guide, args, kwargs, backward=False)
        if not torch.is_tensor(surrogate_loss):
            surrogate_loss = torch.tensor(float(surrogate_loss))
        return surrogate_loss + (loss - surrogate_loss.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        Computes the loss and back-propagates its surrogate into the parameters of the model
        and the guide, particle by particle.

        :returns: an estimate of the loss.
        :rtype: float
        """
        loss, _ = self._evaluate(model, guide, args, kwargs, backward=True)
        return loss


class JointContrastiveMeanFieldELBO(JointContrastiveELBO):
    r"""Like :class:`JointContrastiveELBO`, with the rate of every reparameterized latent site
    computed analytically, :math:`\mathrm{KL}[q(z|x)\|p(z|\cdot)]`, where torch or Pyro register
    a KL for the pair of distributions; other sites fall back to Monte Carlo. The estimator has
    lower variance than the Monte-Carlo one and the same expectation, as in
    :class:`~pyro.infer.TraceMeanField_ELBO`, under the same restriction: the guide's sites
    must be conditionally independent given what the model conditions them on (mean
    field). When a guide site depends on another guide site the analytic KL is taken at the
    sampled parent, and the value (and in general the gradient) is biased, exactly as
    Pyro's; with validation enabled, a guide that samples its sites in another order than
    the model gets Pyro's warning ("Failed to verify mean field restriction").

    Takes the same arguments as :class:`JointContrastiveELBO`. With
    ``estimate_information=True``, the mutual information is still a Monte-Carlo estimate,
    so ``rate = mutual_information + marginal_kl`` holds in expectation only.
    """

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if is_validation_enabled():
            _check_mean_field_requirement(model_trace, guide_trace)  # Pyro's own check
        return model_trace, guide_trace

    def _rate_terms(self, model_trace, guide_trace):
        rate = 0.0
        surrogate = 0.0
        analytic = set()
        for model_site in latent_sites(model_trace):
            guide_site = guide_trace.nodes[model_site["name"]]
            kl = _analytic_kl(guide_site, model_site)
            if kl is None:
                rate = rate - model_site["log_prob_sum"]
                surrogate = surrogate - model_site["log_prob_sum"]
                continue
            analytic.add(model_site["name"])
            rate = rate + kl.detach()
            surrogate = surrogate + kl
        for site in sample_sites(guide_trace):
            if site["name"] in analytic:
                continue
            rate = rate + site["log_prob_sum"]
            entropy_term = site["score_parts"].entropy_term
            if not is_identically_zero(entropy_term):
                surrogate = surrogate + entropy_term.sum()
        return rate, surrogate


def _analytic_kl(guide_site, model_site):
    """Scaled, masked and summed ``KL[q || p]`` at a site, or ``None`` without a closed form,
    a reparameterized guide, or the same mask and scale on both sides (a model site masked
    alone keeps the guide's ``log q``, which only the Monte-Carlo term has)."""
    guide_fn, model_fn = guide_site["fn"], model_site["fn"]
    if not guide_fn.has_rsample:
        return None
    if model_site["mask"] is not guide_site["mask"] or model_site["scale"] != guide_site["scale"]:
        return None
    try:
        kl = kl_divergence(guide_fn, model_fn)
    except NotImplementedError:
        return None
    log_prob = model_site["log_prob"]
    if not torch.is_tensor(kl):  # Pyro's KL of a pair masked out entirely is the number 0
        kl = log_prob.new_full((), float(kl))
    if kl.shape != log_prob.shape:
        kl = kl.expand(torch.broadcast_shapes(kl.shape, log_prob.shape))
    return scale_and_mask(kl, model_site["scale"], model_site["mask"]).sum()
