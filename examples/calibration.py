"""Is the amortized posterior calibrated? Simulation-based calibration on a linear-Gaussian.

Three guides for ``z_i ~ N(0, I_2)``, ``x_i ~ N(A z_i + b, 0.5^2 I_3)``: the exact
posterior, the exact posterior with its scale halved (deliberately overconfident), and an
``AutoAmortizedNormal`` (diagonal) trained with ``ForwardKL``. ``pyro_jc.diagnostics.sbc``
ranks the true latents of simulated data sets among each guide's draws; the script prints
the uniformity test's p-values and the coverage of central credible intervals, and plots
coverage curves and rank histograms.

    python examples/calibration.py --out outputs/calibration
"""

import argparse
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI

from pyro_jc import AutoAmortizedNormal, ForwardKL, optim
from pyro_jc.diagnostics import sbc
from pyro_jc.testing import LinearGaussianModel

A = torch.tensor([[1.0, 0.5], [-0.3, 1.0], [0.8, -0.6]])
B = torch.tensor([0.2, -0.1, 0.0])


def exact_guide(problem, scale=1.0):
    def guide(x):
        posterior = problem.posterior(x)["z"]
        tril = scale * torch.linalg.cholesky(posterior.covariance_matrix)
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.MultivariateNormal(posterior.mean, scale_tril=tril))

    return guide


def trained_guide(problem, args):
    guide = AutoAmortizedNormal(problem.model)
    loss = ForwardKL(num_particles=1)  # one simulated data set of batch-size datapoints
    svi = SVI(problem.model, guide, optim.Adam({"lr": 3e-3}), loss)
    loss.fit(svi, torch.zeros(args.batch_size, 3), num_steps=args.num_steps)
    return guide


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-simulations", type=int, default=1000)
    p.add_argument("--num-posterior-samples", type=int, default=99)
    p.add_argument("--num-steps", type=int, default=2000, help="ForwardKL steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/calibration")
    return p.parse_args(argv)


def main(args):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    problem = LinearGaussianModel(A, B, 0.5, num_data=2, seed=args.seed)
    guides = {
        "exact posterior": exact_guide(problem),
        "scale halved": exact_guide(problem, 0.5),
        "AutoAmortizedNormal + ForwardKL": trained_guide(problem, args),
    }
    results = {}
    x = problem.data  # fixes the data plate's size: SBC simulates data sets of 2 points
    print(f"\n{'guide':34} {'min p-value':>12} {'passes 1%':>10}   coverage at 50/80/90/95/99%")
    for name, guide in guides.items():
        result = sbc(
            problem.model,
            guide,
            x,
            num_simulations=args.num_simulations,
            num_posterior_samples=args.num_posterior_samples,
        )
        results[name] = result
        coverage = " ".join(f"{c:.3f}" for c in result.coverage.mean(0).tolist())
        passes = str(result.passes(0.01))
        print(f"{name:34} {result.p_values.min().item():>12.2e} {passes:>10}   {coverage}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "calibration.png")
    print(f"\nplot: {out / 'calibration.png'}")
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_jc.diagnostics import plots

    fig, axes = plt.subplots(1, 1 + len(results), figsize=(4 * (1 + len(results)), 3.6))
    plots.plot_coverage(results, ax=axes[0])
    axes[0].set_title("coverage of central intervals")
    for ax, (name, result) in zip(axes[1:], results.items(), strict=True):
        plots.plot_rank_histograms(result, ax=ax, max_elements=1)
        ax.set_title(
            f"{name}\nranks of {result.names[0]} (p={result.p_values[0].item():.2g})", fontsize=9
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(parse_args())
