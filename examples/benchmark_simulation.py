"""Simulating a bank with worker processes: pyro_jc's simulate against sbi's simulate_for_sbi.

The simulator is the black-box stochastic SIR epidemic of ``sir_epidemic.py`` (numpy, one
run per call), optionally repeated to make each draw slower. Both sides draw the same number
of pairs from the same prior, with the same number of joblib workers and the same chunk
size (``simulate(batch_size=...)``, ``simulate_for_sbi(simulation_batch_size=...)``), one
after the other in alternating order; the table gives the median wall time of the rounds
and the ratio (pyro_jc / sbi: below 1 is faster).

    python examples/benchmark_simulation.py --num-simulations 4000 --workers 1 2 --rounds 3
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from sir_epidemic import WEEKS, sir_simulator  # noqa: E402

from pyro_jc import Implicit, simulate  # noqa: E402

PRIOR_LOC = torch.tensor([np.log(0.4), np.log(0.125)], dtype=torch.float32)
PRIOR_SCALE = torch.tensor([0.5, 0.2])


def repeated(repeat):
    """The SIR simulator run ``repeat`` times per draw (a slower simulator)."""

    def simulator(beta, gamma):
        for _ in range(repeat - 1):
            sir_simulator(beta, gamma)
        return sir_simulator(beta, gamma)

    return simulator


def pyro_jc_side(num_simulations, workers, batch_size, repeat):
    simulator = repeated(repeat)

    def model(x):
        theta = pyro.sample("theta", dist.LogNormal(PRIOR_LOC, PRIOR_SCALE).to_event(1))
        epidemic = Implicit(
            simulator,
            theta[..., 0],
            theta[..., 1],
            event_shape=(WEEKS,),
            vectorized=False,
            numpy=True,
        )
        pyro.sample("x", epidemic, obs=x)

    start = time.perf_counter()
    bank = simulate(
        model,
        torch.zeros(WEEKS),
        num_simulations=num_simulations,
        batch_size=batch_size,
        num_workers=workers,
    )
    seconds = time.perf_counter() - start
    assert bank["observations"]["x"].shape == (num_simulations, WEEKS)
    return seconds


def sbi_side(num_simulations, workers, batch_size, repeat):
    from sbi.inference import simulate_for_sbi

    simulator = repeated(repeat)

    def batched(theta):  # sbi hands a batch of parameters (numpy with workers)
        theta = np.asarray(theta)
        return torch.as_tensor(np.stack([simulator(b, g) for b, g in theta]), dtype=torch.float32)

    prior = dist.LogNormal(PRIOR_LOC, PRIOR_SCALE).to_event(1)
    start = time.perf_counter()
    theta, x = simulate_for_sbi(
        batched,
        prior,
        num_simulations,
        num_workers=workers,
        simulation_batch_size=batch_size,
        show_progress_bar=False,
    )
    seconds = time.perf_counter() - start
    assert x.shape == (num_simulations, WEEKS)
    return seconds


def main(args):
    torch.set_num_threads(1)
    batch_size = args.batch_size or max(100, args.num_simulations // 100)
    sides = {"pyro_jc": pyro_jc_side, "sbi": sbi_side}
    rows = []
    for workers in args.workers:
        times = {name: [] for name in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in order:
                seconds = sides[name](args.num_simulations, workers, batch_size, args.repeat)
                times[name].append(seconds)
        ours, theirs = (statistics.median(times[n]) for n in ("pyro_jc", "sbi"))
        rows.append((workers, ours, theirs))
    print(
        f"{args.num_simulations} simulations, chunks of {batch_size}, SIR x{args.repeat} per "
        f"draw, median of {args.rounds} rounds"
    )
    print(f"{'workers':>7} {'pyro_jc (s)':>12} {'sbi (s)':>9} {'ratio':>6}")
    for workers, ours, theirs in rows:
        print(f"{workers:>7} {ours:>12.2f} {theirs:>9.2f} {ours / theirs:>6.2f}")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-simulations", type=int, default=4000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=None, help="default: N / 100, >= 100")
    p.add_argument("--repeat", type=int, default=1, help="SIR runs per draw (a slower draw)")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
