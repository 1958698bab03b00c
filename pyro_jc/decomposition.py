"""Minibatch estimates of the rate decomposition ``rate = I_q(x; z) + KL[q(z) || p(z)]``.

The aggregate posterior ``q(z) = E_k q(z | x)`` is estimated on the minibatch with the
stratified estimator of Chen et al. (2018): for a batch of ``B`` out of ``N`` datapoints,

    q(z_i) ~= q(z_i | x_i) / N + (N - 1) / (N (B - 1)) * sum_{j != i} q(z_i | x_j),

which is unbiased for ``q(z_i)`` and exact when the batch is the whole data set. Its logarithm,
and hence ``I_q``, is biased for small batches (Jensen's inequality; the bias shrinks as
``B`` grows), and the ``I_q`` estimate never exceeds ``log N``.

References

[1] Isolating Sources of Disentanglement in Variational Autoencoders,
R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud (2018)

[2] ELBO surgery: yet another way to carve up the variational evidence lower bound,
M. D. Hoffman, M. J. Johnson (2016)
"""

from __future__ import annotations

import math

import torch

from .errors import UnsupportedModelError
from .joints import in_plate, latent_sites, num_datapoints, sample_sites, sum_to_datapoints


def information_terms(model_trace, guide_trace, frame, particle_dim=None):
    """Per-datapoint mutual information and marginal KL from one (possibly vectorized) trace.

    Latents inside the data plate are *local* and enter ``I_q`` through the aggregate
    posterior; latents (and auxiliary guide sites) outside it are *global*: their rate counts
    wholly as marginal mismatch. ``q(z_i | x_j)`` is evaluated with each local guide site's
    distribution at datapoint ``j``, which is exact for guides whose local sites are
    conditionally independent given ``x`` (e.g. VAE encoders).

    :param frame: the data plate.
    :param int particle_dim: dim of vectorized particles, each particle a replicate.
    :returns: ``(mutual_information, marginal_kl)`` as 0-dim tensors in nats per datapoint,
        or ``None`` when the batch has fewer than two datapoints.
    """
    if frame is None or frame.size < 2:
        return None
    size, full_size = frame.size, num_datapoints(frame)
    local = [site for site in latent_sites(model_trace) if in_plate(site, frame)]

    pair_log_q = 0.0  # [replicates, i, j] = log q(z_i | x_j)
    log_p = 0.0  # [replicates, i] = log p(z_i)
    for model_site in local:
        guide_site = guide_trace.nodes[model_site["name"]]
        for site in (model_site, guide_site):
            if site["mask"] is not None:
                raise UnsupportedModelError(
                    f"Site {site['name']!r} is masked (poutine.mask or obs_mask); the mutual "
                    "information estimate does not support masks: pass "
                    "estimate_information=False."
                )
        pair_log_q = pair_log_q + _pairwise_log_prob(guide_site, frame)
        log_p = log_p + sum_to_datapoints(
            model_site["unscaled_log_prob"], model_site, frame, particle_dim
        ).reshape(-1, size)

    global_rate = 0.0
    for site in sample_sites(guide_trace):
        if not in_plate(site, frame):
            global_rate = global_rate + site["log_prob_sum"]
    for site in latent_sites(model_trace):
        if not in_plate(site, frame):
            global_rate = global_rate - site["log_prob_sum"]
    global_rate = torch.as_tensor(global_rate).detach() / full_size

    if not local:
        return global_rate.new_zeros(()), global_rate

    pair_log_q = pair_log_q.detach()
    diag = pair_log_q.diagonal(dim1=-2, dim2=-1)
    eye = torch.eye(size, dtype=torch.bool, device=diag.device)
    others = torch.logsumexp(pair_log_q.masked_fill(eye, -math.inf), dim=-1)
    log_q_marginal = torch.logaddexp(
        diag - math.log(full_size),
        others + math.log((full_size - 1) / (full_size * (size - 1))),
    )
    mutual_information = (diag - log_q_marginal).mean()
    marginal_kl = (log_q_marginal - log_p.detach()).mean() + global_rate
    return mutual_information, marginal_kl


def _pairwise_log_prob(guide_site, frame):
    """``[replicates, i, j] = log q(z_i | x_j)`` for one local guide site."""
    fn, value = guide_site["fn"], guide_site["value"]
    event_dim = len(fn.event_shape)
    data_dim = value.dim() - event_dim + frame.dim
    # Move z_i to a new leftmost dim and leave a size-1 dim where the guide's batch of x_j
    # broadcasts, so one log_prob call scores every (i, j) pair.
    z_i = value.movedim(data_dim, 0).unsqueeze(data_dim + 1)
    pair = fn.log_prob(z_i)  # [i, *outer, j, *inner]
    inner = list(range(data_dim + 2, pair.dim()))
    if inner:
        pair = pair.sum(inner)
    pair = pair.movedim(0, -2)  # [*outer, i, j]
    return pair.reshape(-1, frame.size, frame.size)
