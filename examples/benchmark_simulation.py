"""Simulation with worker processes: pyro_jc's simulate against sbi's simulate_for_sbi, and
ForwardKL training on fresh simulations drawn by workers while it steps.

The simulator is the black-box stochastic SIR epidemic of ``sir_epidemic.py`` (numpy, one
run per call), optionally repeated to make each draw slower. Both sides draw the same number
of pairs from the same prior, with the same number of joblib workers and the same chunk
size (``simulate(batch_size=...)``, ``simulate_for_sbi(simulation_batch_size=...)``), one
after the other in alternating order; the table gives the median wall time of the rounds
and the ratio (pyro_jc / sbi: below 1 is faster).

With ``--train-steps N`` it also trains ``ForwardKL(num_workers=K)`` for N steps of
``--particles`` fresh pairs and compares the wall time with the two parts alone: simulating
those pairs in one process, and the same steps on a bank simulated beforehand. Workers
simulating ahead of training bring the wall time from their sum towards their maximum.

    python examples/benchmark_simulation.py --num-simulations 4000 --workers 1 2 --rounds 3
    python examples/benchmark_simulation.py --repeat 20 --num-simulations 1000 --train-steps 20
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


def sir_model(repeat):
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

    return model


def pyro_jc_side(num_simulations, workers, batch_size, repeat):
    model = sir_model(repeat)

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


def training(steps, particles, workers, repeat, bank=None):
    """Seconds for ``steps`` ForwardKL steps (after one warm-up step that sets the guide and
    the workers up), on fresh pairs or on ``bank``."""
    from pyro.infer import SVI

    from pyro_jc import AutoAmortizedNormal, ForwardKL, optim

    model = sir_model(repeat)
    pyro.clear_param_store()
    if bank is None:
        loss = ForwardKL(num_particles=particles, num_workers=workers)
    else:
        loss = ForwardKL(num_particles=particles, simulations=bank, validation_fraction=0)
    svi = SVI(model, AutoAmortizedNormal(model), optim.Adam({"lr": 1e-3}), loss)
    x = torch.zeros(WEEKS)
    svi.step(x)
    start = time.perf_counter()
    for _ in range(steps):
        svi.step(x)
    seconds = time.perf_counter() - start
    if getattr(loss, "_stream", None) is not None:
        loss._stream[1].close()
    return seconds


def training_table(args):
    steps, particles = args.train_steps, args.particles
    start = time.perf_counter()
    bank = simulate(
        sir_model(args.repeat), torch.zeros(WEEKS), num_simulations=(steps + 1) * particles,
        batch_size=particles,
    )  # fmt: skip
    simulation = (time.perf_counter() - start) * steps / (steps + 1)
    alone = training(steps, particles, 1, args.repeat, bank=bank)
    print(
        f"\nForwardKL, {steps} steps of {particles} fresh pairs (SIR x{args.repeat}): "
        f"simulating alone {simulation:.2f} s, training alone {alone:.2f} s"
    )
    print(f"{'workers':>7} {'wall (s)':>9} {'wall / sum':>11} {'wall / max':>11}")
    for workers in args.workers:
        wall = training(steps, particles, workers, args.repeat)
        print(
            f"{workers:>7} {wall:>9.2f} {wall / (simulation + alone):>11.2f} "
            f"{wall / max(simulation, alone):>11.2f}"
        )


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
    if args.train_steps:
        training_table(args)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-simulations", type=int, default=4000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=None, help="default: N / 100, >= 100")
    p.add_argument("--repeat", type=int, default=1, help="SIR runs per draw (a slower draw)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=0, help="0 skips the training table")
    p.add_argument("--particles", type=int, default=100, help="fresh pairs per step")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
