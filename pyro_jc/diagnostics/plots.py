"""Plots of the diagnostics (matplotlib is an optional dependency, imported on use)."""

from __future__ import annotations

import math

import torch


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "pyro_jc.diagnostics.plots needs matplotlib: pip install matplotlib "
            '(or pip install "pyro-jc[examples]").'
        ) from e
    return plt


def _axes(ax, n=1):
    plt = _pyplot()
    if ax is not None:
        return ax
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    _, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    return axes.ravel()[:n] if n > 1 else axes[0, 0]


def plot_rank_histograms(result, ax=None, max_elements=8):
    """Rank histogram of each latent element (first ``max_elements``) with the 99% band of
    a uniform histogram's bin counts (binomial, normal approximation).

    :param result: an :class:`~pyro_jc.diagnostics.SBCResult`.
    :param ax: a matplotlib axes or a sequence of them (default: a new figure).
    :returns: the list of axes drawn on.
    """
    k = min(len(result.names), max_elements)
    if ax is None:
        axes = _axes(None, k)
        axes = [axes] if k == 1 else list(axes)
    else:  # one axes, or a sequence of them
        axes = list(ax.ravel() if hasattr(ax, "ravel") else ax) if not hasattr(ax, "bar") else [ax]
        axes = axes[:k]
    n = result.ranks.shape[0]
    p = 1.0 / result.num_bins
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    for i, ax_i in enumerate(axes):
        counts = result.histograms[i].cpu().numpy()
        ax_i.bar(range(result.num_bins), counts, width=1.0, color="C0", alpha=0.7)
        ax_i.axhspan(mean - 2.576 * sd, mean + 2.576 * sd, color="grey", alpha=0.25)
        ax_i.set_title(f"{result.names[i]} (p={float(result.p_values[i]):.2g})", fontsize=9)
        ax_i.set_xticks([])
    return axes


def plot_rank_ecdf(result, ax=None, max_elements=8):
    """ECDF of the normalized ranks minus the uniform CDF, per element, with a 99%
    pointwise band (the Dvoretzky-Kiefer-Wolfowitz band is wider; this one flags where).

    :returns: the axes.
    """
    ax = _axes(ax)
    n = result.ranks.shape[0]
    grid = torch.linspace(0, 1, 101)
    band = (2.576 * (grid * (1 - grid) / n).sqrt()).numpy()
    ax.fill_between(grid.numpy(), -band, band, color="grey", alpha=0.25, label="99% band")
    fractions = result.ranks.cpu().to(grid.dtype) / result.num_posterior_samples
    for i in range(min(len(result.names), max_elements)):
        ecdf = (fractions[:, i].unsqueeze(-1) <= grid).to(grid.dtype).mean(0)
        ax.plot(grid.numpy(), (ecdf - grid).numpy(), lw=1, label=result.names[i])
    ax.set_xlabel("normalized rank")
    ax.set_ylabel("ECDF - uniform")
    return ax


def plot_coverage(results, ax=None):
    """Expected coverage of central credible intervals against their level (mean over
    elements); a calibrated guide follows the diagonal, an overconfident one lies below.

    :param dict results: ``{label: SBCResult}``.
    :returns: the axes.
    """
    ax = _axes(ax)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    for label, result in results.items():
        levels = [0.0, *result.coverage_levels, 1.0]
        coverage = [0.0, *result.coverage.mean(0).cpu().tolist(), 1.0]
        ax.plot(levels, coverage, "o-", ms=3, label=label)
    ax.set_xlabel("credible level")
    ax.set_ylabel("empirical coverage")
    ax.set_aspect("equal")
    ax.legend(fontsize=8)
    return ax


def plot_pairs(samples, reference=None, names=None, max_points=2000):
    """Pairwise scatter of posterior samples (``(n, dim)``), against reference samples.

    :returns: the figure.
    """
    plt = _pyplot()
    dim = samples.shape[-1]
    names = names or [f"z{i}" for i in range(dim)]
    fig, axes = plt.subplots(dim, dim, figsize=(2.4 * dim, 2.4 * dim), squeeze=False)
    s = samples[:max_points].detach().cpu().numpy()
    r = None if reference is None else reference[:max_points].detach().cpu().numpy()
    for i in range(dim):
        for j in range(dim):
            ax = axes[i, j]
            if i == j:
                if r is not None:
                    ax.hist(r[:, i], bins=40, density=True, color="k", alpha=0.3)
                ax.hist(s[:, i], bins=40, density=True, color="C0", alpha=0.6)
            else:
                if r is not None:
                    ax.scatter(r[:, j], r[:, i], s=2, color="k", alpha=0.2)
                ax.scatter(s[:, j], s[:, i], s=2, color="C0", alpha=0.3)
            if i == dim - 1:
                ax.set_xlabel(names[j])
            if j == 0:
                ax.set_ylabel(names[i])
    fig.tight_layout()
    return fig
