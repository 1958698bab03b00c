"""Step time of JointContrastiveELBO against Pyro's Trace_ELBO and a hand-written PyTorch ELBO
loop on the same VAE-like model (x dim 64, z dim 8, MLPs of width 128, batch 256).

The three are timed side by side in one run, alternating in rounds, and reported as medians and
ratios. Time with one thread on a shared machine:

    OPENBLAS_NUM_THREADS=1 python examples/benchmark_elbo.py --threads 1
"""

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_jc import JointContrastiveELBO

X_DIM, Z_DIM, HIDDEN, BATCH, N = 64, 8, 128, 256, 4096


def mlp(a, b):
    return nn.Sequential(
        nn.Linear(a, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, b)
    )


class VAE(nn.Module):
    def __init__(self, name="vae"):
        super().__init__()
        self.name = name
        self.encoder = mlp(X_DIM, 2 * Z_DIM)
        self.decoder = mlp(Z_DIM, X_DIM)

    def model(self, x, idx):
        pyro.module(f"{self.name}_decoder", self.decoder)
        with pyro.plate("data", N, subsample=idx):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x[idx])

    def guide(self, x, idx):
        pyro.module(f"{self.name}_encoder", self.encoder)
        with pyro.plate("data", N, subsample=idx):
            loc, log_scale = self.encoder(x[idx]).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def pyro_stepper(loss, device):
    vae = VAE(name=type(loss).__name__).to(device)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)
    return lambda x, idx: svi.step(x, idx)


def torch_stepper(device):
    """The same estimator by hand: reparameterized z, MC rate, loss scaled to the data set."""
    vae = VAE().to(device)
    optim = torch.optim.Adam(vae.parameters(), lr=1e-3)

    def step(x, idx):
        xb = x[idx]
        loc, log_scale = vae.encoder(xb).chunk(2, -1)
        scale = log_scale.exp()
        z = loc + scale * torch.randn_like(loc)
        log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        logits = vae.decoder(z)
        log_px = -nn.functional.binary_cross_entropy_with_logits(logits, xb, reduction="none").sum(
            -1
        )
        loss = -(N / len(idx)) * (log_px + log_pz - log_q).sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
        return loss.item()

    return step


def main(args):
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    torch.manual_seed(0)
    x = (torch.rand(N, X_DIM, device=device) < 0.3).float()
    steppers = {
        "Trace_ELBO": pyro_stepper(Trace_ELBO(), device),
        "JointContrastiveELBO": pyro_stepper(JointContrastiveELBO(), device),
        "PyTorch (hand-written)": torch_stepper(device),
    }
    batches = [torch.randint(0, N, (BATCH,), device=device) for _ in range(args.steps)]
    for step in steppers.values():  # warm-up
        for idx in batches[:5]:
            step(x, idx)
    times = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, step in steppers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for idx in batches:
                step(x, idx)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / len(batches) * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["Trace_ELBO"]
    raw = medians["PyTorch (hand-written)"]
    print(
        f"VAE x{X_DIM} z{Z_DIM} width {HIDDEN} batch {BATCH}, {device}, threads={args.threads}, "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'loss':<24s} {'ms/step':>8s} {'/ Trace_ELBO':>13s} {'/ PyTorch':>10s}")
    for name, ms in medians.items():
        print(f"{name:<24s} {ms:8.3f} {ms / base:13.3f} {ms / raw:10.3f}")
    return medians


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cuda", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
