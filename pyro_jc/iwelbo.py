"""Importance-weighted joint-contrastive bound, one set of K particles per datapoint."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer.elbo import ELBO

from .joints import (
    GuideJointTraces,
    check_data_entropy,
    check_num_particles,
    find_data_plate,
    in_plate,
    num_datapoints,
    raise_nonfinite,
    sample_sites,
    sum_to_datapoints,
)


class JointContrastiveIWELBO(GuideJointTraces, ELBO):
    r"""Importance-weighted joint-contrastive bound (IWAE) with ``K = num_particles``
    particles per datapoint:

    .. math::

        \mathcal{L}_K = \sum_n \log \frac{1}{K} \sum_{k=1}^K
            \frac{p(z_{nk}, x_n)}{q(z_{nk} | x_n)}
            \;\le\; \sum_n \log p(x_n),

    tighter as ``K`` grows and equal to the ELBO at ``K = 1``. The loss is
    :math:`-\mathcal{L}_K` (minus ``num_datapoints * data_entropy`` when given), on the same
    scale as :class:`JointContrastiveELBO`.

    When every latent site lies inside the data plate (a local-latent model such as a VAE),
    the weights factorize per datapoint and each datapoint gets its own ``K`` particles;
    subsampling scales multiply the per-datapoint bounds. Otherwise (global latents) the
    bound is taken over the whole trace, as in :class:`~pyro.infer.RenyiELBO` with
    ``alpha=0``. Reparameterized sites use the pathwise IWAE gradient; non-reparameterized
    sites use the score-function estimator with the leave-one-out baseline of VIMCO.

    :meth:`log_evidence` returns the per-datapoint estimate of :math:`\log p(x_n)` for model
    comparison; :attr:`diagnostics` holds ``"log_evidence"`` (the bound per datapoint),
    ``"elbo"`` (the single-particle bound from the same draws) and ``"ess"`` (mean effective
    sample size of the weights, out of ``K``).

    :param int num_particles: ``K``, the number of importance samples per datapoint.
    :param max_plate_nesting: bound on the number of nested plates; guessed if omitted.
    :param bool vectorize_particles: draw the ``K`` particles in one vectorized run
        (default); otherwise ``K`` sequential runs are stacked.
    :param float data_entropy: entropy of the data distribution in nats per datapoint.
    :param str data_plate: name of the plate over datapoints (default: the outermost plate
        shared by all observed sites).

    References

    [1] Importance Weighted Autoencoders, Y. Burda, R. Grosse, R. Salakhutdinov (2016)

    [2] Variational Inference for Monte Carlo Objectives, A. Mnih, D. J. Rezende (2016)
    """

    def __init__(
        self,
        num_particles: int = 2,
        max_plate_nesting: float = math.inf,
        vectorize_particles: bool = True,
        strict_enumeration_warning: bool = True,
        retain_graph: bool | None = None,
        *,
        data_entropy: float | None = None,
        data_plate: str | None = None,
    ) -> None:
        check_num_particles(num_particles)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            retain_graph=retain_graph,
        )
        self.data_entropy = check_data_entropy(data_entropy)
        self.data_plate = data_plate
        self.diagnostics = {}

    def _log_weights(self, model, guide, args, kwargs):
        """Log weights and score-function terms, each ``[K, batch]``.

        :returns: ``(log_w, score, data_frame, per_datapoint)``; ``batch = 1`` unless
            ``per_datapoint``, and ``score`` is ``None`` when every guide site is
            reparameterized.
        """
        log_ws, scores = [], []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            dim = self._particle_dim()  # known only once max_plate_nesting is guessed
            frame = find_data_plate(model_trace, self.data_plate)
            sites = sample_sites(model_trace) + sample_sites(guide_trace)
            per_datapoint = frame is not None and all(in_plate(s, frame) for s in sites)
            weight_frame = frame if per_datapoint else None
            # Subsampling scales sites by full_size / size: undo it inside the logarithm and
            # apply it to the per-datapoint bounds instead.
            scale = _subsample_scale(weight_frame)
            log_w = 0.0
            score = 0.0
            for site in sample_sites(model_trace):
                log_w = log_w + sum_to_datapoints(site["log_prob"], site, weight_frame, dim)
            for site in sample_sites(guide_trace):
                log_w = log_w - sum_to_datapoints(site["log_prob"], site, weight_frame, dim)
                term = site["score_parts"].score_function
                if not is_identically_zero(term):
                    score = score + sum_to_datapoints(term, site, weight_frame, dim)
            log_w = (log_w / scale).reshape(-1, log_w.shape[-1])
            if not bool(torch.isfinite(log_w.detach()).all()):
                raise_nonfinite(model_trace, guide_trace, log_w.detach().sum())
            log_ws.append(log_w)
            scores.append(score / scale if torch.is_tensor(score) else None)
        log_w = torch.cat(log_ws)
        if all(score is None for score in scores):
            return log_w, None, frame, per_datapoint
        score = torch.cat(
            [
                torch.zeros_like(w) if s is None else s.reshape(-1, w.shape[-1]).expand_as(w)
                for w, s in zip(log_ws, scores, strict=True)
            ]
        )
        return log_w, score, frame, per_datapoint

    def _evaluate(self, model, guide, args, kwargs):
        log_w, score, frame, per_datapoint = self._log_weights(model, guide, args, kwargs)
        num_particles = log_w.shape[0]
        scale = _subsample_scale(frame if per_datapoint else None)
        bound = torch.logsumexp(log_w, dim=0) - math.log(num_particles)  # [batch]
        surrogate = bound
        if score is not None:
            signal = _vimco_signal(log_w.detach()) if num_particles > 1 else log_w.detach()
            surrogate = surrogate + (score * signal).sum(0)
        surrogate_loss = -scale * surrogate.sum()

        log_w = log_w.detach()
        weights = torch.softmax(log_w, dim=0)
        bound_sum, elbo_sum, ess = torch.stack(
            [
                scale * bound.detach().sum(),
                scale * log_w.mean(0).sum(),
                (1.0 / (weights**2).sum(0)).mean(),
            ]
        ).tolist()
        n = num_datapoints(frame)
        loss = -bound_sum
        if self.data_entropy is not None:
            loss -= n * self.data_entropy
        self.diagnostics = {
            "loss": loss,
            "log_evidence": bound_sum / n,
            "elbo": elbo_sum / n,
            "ess": ess,
            "num_datapoints": n,
        }
        return loss, surrogate_loss

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        :returns: an estimate of the negative importance-weighted bound.
        :rtype: float
        """
        with torch.no_grad():
            loss, _ = self._evaluate(model, guide, args, kwargs)
        return loss

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        :returns: a differentiable surrogate of the loss (value: the loss estimate).
        :rtype: torch.Tensor
        """
        loss, surrogate_loss = self._evaluate(model, guide, args, kwargs)
        return surrogate_loss + (loss - surrogate_loss.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        :returns: an estimate of the loss, after back-propagating its surrogate.
        :rtype: float
        """
        loss, surrogate_loss = self._evaluate(model, guide, args, kwargs)
        if surrogate_loss.requires_grad:
            surrogate_loss.backward(retain_graph=self.retain_graph)
        return loss

    def log_evidence(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Per-datapoint estimate of :math:`\\log p(x_n)` with ``K = num_particles`` importance
        samples (a stochastic lower bound whose bias shrinks as ``K`` grows).

        :returns: a tensor of shape ``(batch,)`` over the data plate (``(1,)`` for a model
            with global latents or no data plate).
        """
        with torch.no_grad():
            log_w, _, _, _ = self._log_weights(model, guide, args, kwargs)
            return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def _vimco_signal(log_w):
    """Learning signal ``L - L_{-k}`` per particle: ``L_{-k}`` replaces particle ``k``'s weight
    by the geometric mean of the others (VIMCO)."""
    num_particles = log_w.shape[0]
    total = torch.logsumexp(log_w, dim=0)
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (num_particles - 1)
    # log sum_j w_j with w_k replaced: log(sum_j w_j - w_k + exp(others_mean_k))
    without_k = _log_sub_exp(total.expand_as(log_w), log_w)
    loo = torch.logaddexp(without_k, others_mean)
    return total - loo


def _log_sub_exp(a, b):
    """``log(exp(a) - exp(b))`` for ``a >= b``."""
    return a + torch.log1p(-torch.exp(b - a).clamp(max=1.0))


def _subsample_scale(frame):
    return num_datapoints(frame) / frame.size if frame is not None else 1.0
