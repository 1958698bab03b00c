"""Data-parallel ForwardKL training with torch.distributed: each process simulates its own
pairs, or reads its own share of a bank on disk; gradients are averaged over the processes
(pyro_jc.distributed.DistributedOptim).

    python examples/distributed_training.py                          # one process
    torchrun --standalone --nproc_per_node=2 examples/distributed_training.py
    torchrun --standalone --nproc_per_node=2 examples/distributed_training.py --bank 20000

Each prints the same accuracy table (the amortized posterior against the exact one of a
linear-Gaussian model, on held-out observations): K processes with num_particles / K pairs
each train as one process with num_particles pairs. With --bank, rank 0 simulates a bank
into a store on disk, each process trains on its own chunks (ForwardKL(shard=...)) with
early stopping on the whole validation split, and the table gives the time per epoch.
"""

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pyro  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pyro.infer import SVI  # noqa: E402

from pyro_jc import AutoAmortizedNormal, ForwardKL, optim, simulate  # noqa: E402
from pyro_jc.distributed import DistributedOptim  # noqa: E402
from pyro_jc.store import BankStore  # noqa: E402
from pyro_jc.testing import LinearGaussianModel  # noqa: E402


def main(args):
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    problem = LinearGaussianModel.random(2, 3, sigma=0.5, num_data=1, seed=0, dtype=torch.float32)
    x_obs = problem.data
    if args.num_particles % world:
        raise SystemExit(f"--num-particles must be a multiple of the {world} processes")
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)  # the same on every rank: the same initial guide
    guide = AutoAmortizedNormal(problem.model)
    adam = optim.Adam({"lr": args.lr})
    if args.bank:
        store = bank_store(problem, args, rank, distributed)
        loss = ForwardKL(
            num_particles=args.num_particles // world,
            simulations=store,
            shard=(rank, world),
            generator=torch.Generator().manual_seed(args.seed),  # one split for all ranks
        )
    else:
        loss = ForwardKL(num_particles=args.num_particles // world)
    svi = SVI(problem.model, guide, DistributedOptim(adam) if distributed else adam, loss)
    start = time.perf_counter()
    if args.bank:
        history = loss.fit(svi, x_obs, max_epochs=args.epochs)
        rounds, unit = history["epochs"], "epoch"
    else:
        svi.step(x_obs)  # set-up: the guide and its standardization, alike on every rank
        pyro.set_rng_seed(args.seed + 1 + rank)  # then each rank simulates its own pairs
        for _ in range(args.steps - 1):
            svi.step(x_obs)
        rounds, unit = args.steps, "step"
    seconds = (time.perf_counter() - start) / rounds

    x_test = problem.sample_data(seed=99, num_data=200)
    mean, cov = problem.posterior_moments(x_test)
    sd = cov.diagonal().sqrt()
    with torch.no_grad():
        z = guide.sample_posterior(x_test.unsqueeze(-2), num_samples=2000)["z"].squeeze(-2)
    mean_error = ((z.mean(0) - mean).abs() / sd).mean().item()
    sd_ratio = (z.std(0) / sd).mean().item()
    checksum = sum(p.detach().double().sum().item() for p in guide.parameters())
    if distributed:
        sums = [None] * world
        dist.all_gather_object(sums, checksum)
        same = all(abs(c - sums[0]) < 1e-6 * max(1.0, abs(sums[0])) for c in sums)
    else:
        same = True
    if args.bank and not args.store and rank == 0:
        shutil.rmtree(store.path)  # every rank is past its last read (the gather above)
    if rank == 0:
        print(
            f"{'processes':>9} {'pairs/step':>10} {unit + 's':>7} {'s/' + unit:>8} "
            f"{'mean error (sd)':>16} {'sd ratio':>9} {'ranks agree':>12}"
        )
        print(
            f"{world:>9} {args.num_particles:>10} {rounds:>7} {seconds:>8.3f} "
            f"{mean_error:>16.3f} {sd_ratio:>9.3f} {str(same):>12}"
        )
    if distributed:
        dist.destroy_process_group()


def bank_store(problem, args, rank, distributed):
    """Rank 0 simulates the bank into a store on disk (in chunks of 500: whole chunks go
    to each rank); the others wait, then open it."""
    path = [args.store or (tempfile.mkdtemp(prefix="pyro_jc_bank_") if rank == 0 else None)]
    if distributed:
        dist.broadcast_object_list(path, src=0)
    if rank == 0:
        with torch.random.fork_rng():
            pyro.set_rng_seed(args.seed + 100)
            simulate(problem.model, problem.data, num_simulations=args.bank, batch_size=500,
                     path=path[0])  # fmt: skip
    if distributed:
        dist.barrier()
    return BankStore.open(path[0])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--num-particles", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bank", type=int, default=0, help="train on a bank of this many (0: fresh)")
    p.add_argument("--epochs", type=int, default=100, help="at most, with --bank")
    p.add_argument("--store", default=None, help="the bank's store (default: a temporary one)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
