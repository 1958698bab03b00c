"""CPU against GPU: the time of pyro_jc's heavy steps on each device, side by side.

* JointContrastiveELBO: one SVI step of a VAE (784-dim Bernoulli decoder, 16-dim latent,
  hidden layers of 512) on a minibatch of 4,096 synthetic binary images.
* ForwardKL: one SVI step of AutoAmortizedFlow on a linear-Gaussian model (10 latents, 20
  observations) with 10,000 fresh simulations per step.
* c2st: sbibm's classifier two-sample test on 10,000 + 10,000 two-dimensional samples (a
  fixed 20 epochs, so that both devices do the same work).

Each row is the median over rounds in which the devices alternate; the CUDA column is left
out where no GPU is present. ``make gpu-check`` runs it after the device-parametrized tests.

    python examples/benchmark_devices.py
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI  # noqa: E402
from vae_digits import VAE  # noqa: E402

from pyro_jc import AutoAmortizedFlow, ForwardKL, JointContrastiveELBO, optim  # noqa: E402
from pyro_jc.diagnostics import c2st  # noqa: E402
from pyro_jc.testing import LinearGaussianModel  # noqa: E402


def vae_step(device, batch):
    """A ready-to-step closure: set-up and one warm-up step happen here, untimed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = (torch.rand(batch, 784, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    x = x.to(device)
    vae = VAE(x_dim=784, z_dim=16, hidden=512).to(device)
    svi = SVI(vae.model, vae.guide, optim.Adam({"lr": 1e-3}), JointContrastiveELBO())
    svi.step(x)
    return lambda: svi.step(x)


def forward_kl_step(device, num):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    problem = LinearGaussianModel.random(
        10, 20, sigma=0.5, num_data=1, seed=0, device=device, dtype=torch.float32
    )
    guide = AutoAmortizedFlow(problem.model, num_transforms=3, flow_hidden_dims=(64, 64))
    svi = SVI(problem.model, guide, optim.Adam({"lr": 1e-3}), ForwardKL(num_particles=num))
    svi.step(problem.data)
    return lambda: svi.step(problem.data)


def c2st_run(device, num):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(num, 2, generator=g).to(device)
    Y = (torch.randn(num, 2, generator=g) + 0.1).to(device)
    return lambda: c2st(X, Y, max_epochs=20, patience=1000)


def timed(run, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(args):
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    cases = [
        (f"JointContrastiveELBO VAE step, batch {args.batch}", vae_step, args.batch),
        (f"ForwardKL flow step, {args.simulations} simulations", forward_kl_step, args.simulations),
        (f"c2st, {args.c2st_samples} + {args.c2st_samples} samples, 20 epochs", c2st_run,
         args.c2st_samples),
    ]  # fmt: skip
    name = torch.cuda.get_device_name() if len(devices) > 1 else "none"
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), GPU: {name}")
    print(f"{'case':<58} {'cpu s':>9} {'cuda s':>9} {'cpu/cuda':>9}")
    for label, make, size in cases:
        runs = {device: make(device, size) for device in devices}
        times = {device: [] for device in devices}
        for r in range(args.rounds):
            order = devices if r % 2 == 0 else devices[::-1]  # sides alternate
            for device in order:
                times[device].append(timed(runs[device], device))
        med = {d.type: statistics.median(t) for d, t in times.items()}
        cuda = f"{med['cuda']:>9.4f}" if "cuda" in med else f"{'-':>9}"
        ratio = f"{med['cpu'] / med['cuda']:>9.1f}" if "cuda" in med else f"{'-':>9}"
        print(f"{label:<58} {med['cpu']:>9.4f} {cuda} {ratio}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--simulations", type=int, default=10000)
    p.add_argument("--c2st-samples", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu-only", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
