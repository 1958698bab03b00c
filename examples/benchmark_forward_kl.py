"""ForwardKL against Pyro's CSIS and against a hand-written PyTorch loop (speed).

A small amortized linear-Gaussian model, ``z ~ N(0, I_2)``, ``x | z ~ N(A z, 0.5^2 I_5)``,
whose posterior is known exactly:

* CSIS vs ForwardKL: the same guide (an MLP from ``x`` to a full-covariance Gaussian,
  written for CSIS's ``observations=`` convention) trained by ``pyro.infer.CSIS`` (one
  simulated pair at a time, batches of 50) and by ``SVI(..., ForwardKL(num_particles=50))``
  (one vectorized batch). Quality is the exact ``KL(q(z|x) || p(z|x))`` averaged over 500
  held-out ``x``; the table gives the wall time each needs to reach CSIS's final quality.
* Step time: ``SVI`` + ``ForwardKL`` + ``AutoAmortizedFlow`` (5 MAF layers of width 50)
  against a hand-written PyTorch loop (the same simulator, the same flow layers built from
  Pyro's transforms, one ``torch.optim.Adam``), both 200 fresh simulations per step.
  Sides alternate; medians over rounds.

    python examples/benchmark_forward_kl.py
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import CSIS, SVI  # noqa: E402
from torch import nn  # noqa: E402

from pyro_jc import AutoAmortizedFlow, ForwardKL, optim  # noqa: E402

D, M, SIGMA = 2, 5, 0.5
A = torch.linspace(-1.0, 1.0, M * D).reshape(M, D) + torch.eye(M, D)


def model(observations=None):
    z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    x = None if observations is None else observations["x"]
    return pyro.sample("x", dist.Normal(z @ A.T, SIGMA).to_event(1), obs=x)


def exact_posterior(x):
    precision = torch.eye(D) + A.T @ A / SIGMA**2
    cov = torch.linalg.inv(precision)
    return (x @ A / SIGMA**2) @ cov, cov


class GaussianGuide(nn.Module):
    """``q(z | x) = N(mu(x), L(x) L(x)^T)`` from an MLP; observations as CSIS passes them."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(M, 64), nn.ReLU(), nn.Linear(64, D + D * (D + 1) // 2))
        self.tril = torch.tril_indices(D, D)

    def posterior(self, x):
        out = self.net(x)
        scale_tril = out.new_zeros(out.shape[:-1] + (D, D))
        scale_tril[..., self.tril[0], self.tril[1]] = out[..., D:]
        diag = nn.functional.softplus(scale_tril.diagonal(dim1=-2, dim2=-1)) + 1e-4
        scale_tril = scale_tril.tril(-1) + torch.diag_embed(diag)
        return dist.MultivariateNormal(out[..., :D], scale_tril=scale_tril)

    def forward(self, observations=None):
        pyro.module("gaussian_guide", self)
        return pyro.sample("z", self.posterior(observations["x"]))


def mean_exact_kl(guide, x):
    """Average over ``x`` of the exact ``KL(q(z | x) || p(z | x))``."""
    with torch.no_grad():
        loc, cov = exact_posterior(x)
        q = guide.posterior(x)
        return torch.distributions.kl_divergence(q, dist.MultivariateNormal(loc, cov)).mean().item()


def held_out_x(n, seed):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=generator)
    return z @ A.T + SIGMA * torch.randn(n, M, generator=generator)


# -- CSIS against ForwardKL ----------------------------------------------------------------------


def kl_curve(step, guide, x_test, seconds, every=0.05):
    """Run ``step()`` for ``seconds`` of training time; record (time, KL) every ``every`` s."""
    curve, elapsed, next_check = [], 0.0, 0.0
    while elapsed < seconds:
        start = time.perf_counter()
        step()
        elapsed += time.perf_counter() - start
        if elapsed >= next_check:
            curve.append((elapsed, mean_exact_kl(guide, x_test)))
            next_check += every
    return curve


def time_to_reach(curve, target):
    return next((t for t, kl in curve if kl <= target), float("nan"))


def csis_against_forward_kl(args):
    x_test, x0 = held_out_x(500, seed=1), {"x": torch.zeros(M)}
    curves = {}
    for side in ("CSIS", "ForwardKL"):
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = GaussianGuide()
        adam = pyro.optim.Adam({"lr": 1e-3})  # CSIS and SVI alike, as Pyro users write it
        if side == "CSIS":
            csis = CSIS(model, guide, adam, training_batch_size=args.batch_size)
            curves[side] = kl_curve(
                lambda c=csis: c.step(observations=x0), guide, x_test, args.csis_seconds
            )
        else:
            # The guide reads x from `observations`: map the simulated x back into it.
            loss = ForwardKL(
                num_particles=args.batch_size,
                observations=lambda values, *a, **kw: (a, {"observations": values}),
            )
            svi = SVI(model, guide, adam, loss)
            curves[side] = kl_curve(
                lambda s=svi: s.step(observations=x0), guide, x_test, args.csis_seconds
            )
    target = max(min(kl for _, kl in curves["CSIS"]), args.kl_floor)
    reach = {side: time_to_reach(curve, target) for side, curve in curves.items()}
    print(f"\nCSIS vs ForwardKL: same guide, batches of {args.batch_size} simulated pairs")
    print(f"{'':12} {'final KL':>9} {f'seconds to KL <= {target:.3f}':>26}")
    for side, curve in curves.items():
        print(f"{side:12} {curve[-1][1]:>9.4f} {reach[side]:>26.2f}")
    speedup = reach["CSIS"] / reach["ForwardKL"]
    print(f"ForwardKL reaches CSIS's quality {speedup:.0f}x sooner")
    return {"target_kl": target, "seconds": reach, "speedup": speedup}


# -- step time against hand-written PyTorch ---------------------------------------------------


def flow_model(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    return pyro.sample("x", dist.Normal(z @ A.T, SIGMA).to_event(1), obs=x)


def pyro_jc_stepper(batch_size):
    guide = AutoAmortizedFlow(flow_model, num_transforms=5, flow_hidden_dims=(50, 50))
    svi = SVI(flow_model, guide, optim.Adam({"lr": 1e-3}), ForwardKL(batch_size))
    x0 = torch.zeros(M)
    return lambda: svi.step(x0)


def hand_written_stepper(batch_size):
    """The same simulator and flow (embedding MLP, 5 conditional MAF layers with fixed
    permutations, standardization of x and z) in a plain PyTorch loop."""
    T = dist.transforms
    embedding = nn.Sequential(nn.Linear(M, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    embedding.append(nn.Linear(64, 64))
    layers = nn.ModuleList(T.conditional_affine_autoregressive(D, 64, [50, 50]) for _ in range(5))
    perms = [torch.randperm(D) for _ in range(5)]
    params = list(embedding.parameters()) + list(layers.parameters())
    adam = torch.optim.Adam(params, lr=1e-3)
    with torch.no_grad():  # standardization fitted once, as the autoguide does
        z = torch.randn(1000, D)
        x = z @ A.T + SIGMA * torch.randn(1000, M)
        x_mean, x_std, z_mean, z_std = x.mean(0), x.std(0), z.mean(0), z.std(0)

    def step():
        z = torch.randn(batch_size, D)
        x = z @ A.T + SIGMA * torch.randn(batch_size, M)
        context = embedding((x - x_mean) / x_std)
        transforms = []
        for i, layer in enumerate(layers):
            transforms.append(layer.condition(context).inv)
            if i < len(layers) - 1:
                transforms.append(T.Permute(perms[i]))
        transforms.append(T.AffineTransform(z_mean, z_std, event_dim=1))
        base = dist.Normal(torch.zeros(D), 1.0).expand([batch_size, D]).to_event(1)
        loss = -dist.TransformedDistribution(base, transforms).log_prob(z).mean()
        adam.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)  # as ForwardKL's default clip_norm
        adam.step()
        return loss.item()

    return step


def step_times(args):
    pyro.clear_param_store()
    steppers = {
        "ForwardKL + AutoAmortizedFlow": pyro_jc_stepper(args.step_batch),
        "PyTorch (hand-written)": hand_written_stepper(args.step_batch),
    }
    for step in steppers.values():  # warm up (and set up the autoguide)
        for _ in range(20):
            step()
    times = {name: [] for name in steppers}
    names = list(steppers)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                steppers[name]()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians[names[0]] / medians[names[1]]
    print(f"\nStep time, {args.step_batch} fresh simulations per step (median of {args.rounds})")
    for name, ms in medians.items():
        print(f"{name:32} {ms:8.3f} ms")
    print(f"ratio ForwardKL / PyTorch: {ratio:.2f}")
    return {"medians_ms": medians, "ratio": ratio}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=50, help="pairs per CSIS/ForwardKL step")
    p.add_argument("--csis-seconds", type=float, default=60.0)
    p.add_argument("--kl-floor", type=float, default=0.01)
    p.add_argument("--step-batch", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(args):
    torch.set_num_threads(1)
    return {"csis": csis_against_forward_kl(args), "step": step_times(args)}


if __name__ == "__main__":
    main(parse_args())
