"""Amortized inference for a black-box stochastic epidemic simulator (numpy, one run per call).

A stochastic SIR model (chain-binomial, in numpy) reports weekly new infections; its
likelihood has no closed form. The Pyro model wraps it in ``pyro_jc.Implicit``, and an
amortized conditional flow is trained with ``pyro_jc.ForwardKL`` on a simulation bank. The
trained guide then gives the posterior of the infection and recovery rates for any
observed epidemic curve at once; the script plots posteriors against the true parameters.

    python examples/sir_epidemic.py --num-simulations 20000 --out outputs/sir
"""

import argparse
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI

from pyro_jc import AutoAmortizedFlow, ForwardKL, Implicit, simulate

POPULATION = 1000
WEEKS = 10
DAYS_PER_WEEK = 7


def sir_simulator(beta, gamma, rng=np.random):
    """One epidemic: numpy scalars in, weekly new infections (log1p) out."""
    s, i = POPULATION - 5, 5
    weekly = np.zeros(WEEKS)
    for day in range(WEEKS * DAYS_PER_WEEK):
        new_infections = rng.binomial(s, 1.0 - np.exp(-beta * i / POPULATION))
        recoveries = rng.binomial(i, 1.0 - np.exp(-gamma))
        s, i = s - new_infections, i + new_infections - recoveries
        weekly[day // DAYS_PER_WEEK] += new_infections
    return np.log1p(weekly)


def model(x):
    beta = pyro.sample("beta", dist.LogNormal(np.log(0.4), 0.5))
    gamma = pyro.sample("gamma", dist.LogNormal(np.log(0.125), 0.2))
    epidemic = Implicit(
        sir_simulator, beta, gamma, event_shape=(WEEKS,), vectorized=False, numpy=True
    )
    return pyro.sample("x", epidemic, obs=x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-simulations", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--num-observations", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/sir_epidemic")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(args):
    pyro.set_rng_seed(args.seed)
    np.random.seed(args.seed)
    x_placeholder = torch.zeros(WEEKS)

    start = time.perf_counter()
    bank = simulate(
        model, x_placeholder, num_simulations=args.num_simulations, progress=not args.quiet
    )
    simulate_s = time.perf_counter() - start

    guide = AutoAmortizedFlow(model, transform="spline_autoregressive", num_transforms=3)
    loss = ForwardKL(num_particles=args.batch_size, simulations=bank)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": args.learning_rate}), loss)
    start = time.perf_counter()
    history = loss.fit(svi, x_placeholder, max_epochs=args.max_epochs, progress=not args.quiet)
    train_s = time.perf_counter() - start

    # Fresh test epidemics with known parameters: posterior for all of them at once.
    test = simulate(model, x_placeholder, num_simulations=args.num_observations)
    truth = {k: v.squeeze(-1) for k, v in test["latents"].items()}
    samples = guide.sample_posterior(test["observations"]["x"], num_samples=2000)
    results = {
        "simulate_s": simulate_s,
        "train_s": train_s,
        "epochs": history["epochs"],
        "validation_loss": min(history["validation_loss"]),
    }
    lines = [
        f"simulated {args.num_simulations} epidemics in {simulate_s:.1f} s; trained "
        f"{history['epochs']} epochs in {train_s:.1f} s (best validation -log q = "
        f"{results['validation_loss']:.3f})",
        f"{'obs':>4} {'beta true':>10} {'beta post.':>16} {'gamma true':>11} {'gamma post.':>16}",
    ]
    coverage = []
    for j in range(args.num_observations):
        row = [f"{j:>4}"]
        for name in ("beta", "gamma"):
            s = samples[name][:, j]
            lo, hi = s.quantile(0.05).item(), s.quantile(0.95).item()
            coverage.append(lo <= truth[name][j].item() <= hi)
            row.append(
                f"{truth[name][j].item():>10.3f} {s.median().item():>7.3f} [{lo:.2f},{hi:.2f}]"
            )
        lines.append(" ".join(row))
    results["coverage_90"] = float(np.mean(coverage))
    if not args.quiet:
        print("\n".join(lines))
    _plot(samples, truth, Path(args.out))
    return results


def _plot(samples, truth, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    n = truth["beta"].shape[0]
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3), squeeze=False)
    for j, ax in enumerate(axes[0]):
        ax.scatter(samples["beta"][:, j].numpy(), samples["gamma"][:, j].numpy(), s=2, alpha=0.2)
        ax.plot(truth["beta"][j].item(), truth["gamma"][j].item(), "r*", markersize=12)
        ax.set_xlabel("infection rate beta")
        ax.set_title(f"observation {j}")
    axes[0][0].set_ylabel("recovery rate gamma")
    fig.tight_layout()
    fig.savefig(out / "sir_epidemic.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(parse_args())
