"""Flow guides: what a draw's density costs. Times, side by side in one run (sides alternating,
medians of rounds), on a latent of ``--latent-dim`` dimensions (default 2) with an
autoregressive spline flow:

* 100,000 posterior draws with their densities, as ``TruncatedPrior`` takes them for its
  threshold: ``sample_posterior`` then ``log_prob`` (a second pass through the flow) against
  ``sample_and_log_prob`` (the layers keep the log-determinants of the pass that drew);
  ``sample_posterior`` alone for reference; and ``TruncatedPrior``'s threshold itself
  (the same draws, in chunks that fit a CPU's cache);
* a reparameterized ELBO step (Pyro's ``Trace_ELBO``, 64 vectorized particles) with the
  autoregressive layers placed for the density (``fast="log_prob"``: sampling takes one pass
  per dimension) and for sampling (``fast="sample"``: one pass).

Time with one thread on a shared machine:

    OPENBLAS_NUM_THREADS=1 python examples/benchmark_flow_draws.py
    OPENBLAS_NUM_THREADS=1 python examples/benchmark_flow_draws.py --latent-dim 10
"""

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_jc import AutoAmortizedFlow
from pyro_jc import optim as jc_optim
from pyro_jc.sequential import TruncatedPrior


def model(x):
    z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def trained_guide(x, fast, steps):
    """A flow guide after a few ELBO steps (its layers no longer the identity), and its SVI."""
    guide = AutoAmortizedFlow(model, transform="spline_autoregressive", fast=fast)
    elbo = Trace_ELBO(num_particles=64, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, jc_optim.Adam({"lr": 1e-2}), elbo)
    for _ in range(steps):
        svi.step(x)
    return guide, svi


def main(args):
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    x = torch.randn(10, args.latent_dim) + 1.0
    # Module-local parameters: each guide and SVI keeps its own, side by side.
    with pyro.settings.context(module_local_params=True):
        guide, _ = trained_guide(x, "log_prob", args.warmup)
        steppers = {fast: trained_guide(x, fast, args.warmup)[1] for fast in ("log_prob", "sample")}

        def two_passes():
            draws = guide.sample_posterior(x, num_samples=args.draws)
            with torch.no_grad():
                guide.log_prob(draws, x)

        tasks = {
            "sample_posterior, then log_prob": two_passes,
            "sample_and_log_prob": lambda: guide.sample_and_log_prob(x, num_samples=args.draws),
            "sample_posterior alone": lambda: guide.sample_posterior(x, num_samples=args.draws),
            "TruncatedPrior threshold": lambda: TruncatedPrior(
                model, guide, x, num_threshold_samples=args.draws
            ),
            'ELBO step, fast="log_prob"': lambda: steppers["log_prob"].step(x),
            'ELBO step, fast="sample"': lambda: steppers["sample"].step(x),
        }
        times = {name: [] for name in tasks}
        for r in range(args.rounds):
            # Alternate which side goes first.
            for name in list(tasks)[:: 1 if r % 2 == 0 else -1]:
                repeats = args.steps if name.startswith("ELBO") else 1
                start = time.perf_counter()
                for _ in range(repeats):
                    tasks[name]()
                times[name].append((time.perf_counter() - start) / repeats * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.latent_dim}-D latent, autoregressive spline flow, {args.draws:,} draws, ELBO "
        "steps of 64 "
        f"particles; threads={args.threads}, {args.rounds} rounds"
    )
    print(f"{'task':<34s} {'ms':>9s} {'ratio':>7s}")
    pairs = [
        ("sample_posterior, then log_prob", "sample_and_log_prob"),
        ("sample_posterior, then log_prob", "sample_posterior alone"),
        ("sample_and_log_prob", "TruncatedPrior threshold"),
        ('ELBO step, fast="log_prob"', 'ELBO step, fast="sample"'),
    ]
    reference = {b: a for a, b in pairs}
    for name, ms in medians.items():
        ratio = f"{ms / medians[reference[name]]:7.2f}" if name in reference else f"{'1':>7s}"
        print(f"{name:<34s} {ms:9.2f} {ratio}")
    return medians


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=100_000)
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="ELBO steps per round")
    parser.add_argument("--warmup", type=int, default=20, help="ELBO steps before timing")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
