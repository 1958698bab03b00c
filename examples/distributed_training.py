"""Data-parallel ForwardKL training with torch.distributed: each process simulates its own
pairs, gradients are averaged over the processes (pyro_jc.distributed.DistributedOptim).

    python examples/distributed_training.py                          # one process
    torchrun --standalone --nproc_per_node=2 examples/distributed_training.py

Both print the same accuracy table (the amortized posterior against the exact one of a
linear-Gaussian model, on held-out observations): K processes with num_particles / K pairs
each train as one process with num_particles pairs.
"""

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pyro  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pyro.infer import SVI  # noqa: E402

from pyro_jc import AutoAmortizedNormal, ForwardKL, optim  # noqa: E402
from pyro_jc.distributed import DistributedOptim  # noqa: E402
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
    loss = ForwardKL(num_particles=args.num_particles // world)
    svi = SVI(problem.model, guide, DistributedOptim(adam) if distributed else adam, loss)
    svi.step(x_obs)  # set-up: the guide and its standardization, alike on every rank
    pyro.set_rng_seed(args.seed + 1 + rank)  # then each rank simulates its own pairs
    for _ in range(args.steps - 1):
        svi.step(x_obs)

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
    if rank == 0:
        print(
            f"{'processes':>9} {'pairs/step':>10} {'steps':>6} {'mean error (sd)':>16} "
            f"{'sd ratio':>9} {'ranks agree':>12}"
        )
        print(
            f"{world:>9} {args.num_particles:>10} {args.steps:>6} {mean_error:>16.3f} "
            f"{sd_ratio:>9.3f} {str(same):>12}"
        )
    if distributed:
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--num-particles", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
