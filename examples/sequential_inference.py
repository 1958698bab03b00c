"""Sequential inference for one observation: truncated proposals on the two-moons model.

The two-moons simulator (sbibm's ``two_moons``, written here in torch as a black box)
has a crescent-shaped posterior with two modes. ``fit_sequential`` trains an
``AutoAmortizedFlow`` in rounds: round 1 on the prior, each later round on the prior
truncated to the current guide's highest-density region at the observation. The script
prints each round's acceptance rate and the flow's held-out loss, and plots the posterior
after each round next to the prior's samples of that round.

    python examples/sequential_inference.py --num-simulations 2000 --rounds 5
"""

import argparse
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from pyro_jc import AutoAmortizedFlow, Implicit, Posterior, optim
from pyro_jc.diagnostics import misspecification_test
from pyro_jc.sequential import fit_sequential


def two_moons_simulator(theta):
    """sbibm's two moons: ``theta`` (n, 2) -> ``x`` (n, 2)."""
    n = theta.shape[:-1]
    a = (torch.rand(n) - 0.5) * math.pi
    r = 0.1 + 0.01 * torch.randn(n)
    p = torch.stack([r * torch.cos(a) + 0.25, r * torch.sin(a)], -1)
    z0 = -(theta[..., 0] + theta[..., 1]).abs() / math.sqrt(2)
    z1 = (-theta[..., 0] + theta[..., 1]) / math.sqrt(2)
    return p + torch.stack([z0, z1], -1)


def model(x):
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    sim = Implicit(two_moons_simulator, theta, event_shape=(2,), param_event_dims=1)
    pyro.sample("x", sim, obs=x)


def main(args):
    torch.set_num_threads(1)
    pyro.set_rng_seed(args.seed)
    x_o = torch.zeros(2)  # sbibm's observation 1 is near here: two crescents
    guide = AutoAmortizedFlow(model, num_transforms=5, interval_transform="box")
    snapshots = []

    def keep(round_, guide, history):
        theta = Posterior(guide, x_o).sample(2000)["theta"]
        snapshots.append(theta)

    history = fit_sequential(
        model,
        guide,
        x_o,
        num_simulations=args.num_simulations,
        num_rounds=args.rounds,
        optim=optim.Adam({"lr": 1e-3}),
        callback=keep,
    )
    if not args.quiet:
        print(f"{'round':>5} {'simulations':>11} {'acceptance':>10} {'epochs':>6} {'-log q':>8}")
        for r in history["rounds"]:
            print(
                f"{r['round']:>5} {r['simulations']:>11} {r['acceptance_rate']:>10.3f} "
                f"{r['epochs']:>6} {r['validation_loss']:>8.3f}"
            )
    posterior = Posterior(guide, x_o)
    check = misspecification_test(model, guide, x_o, num_simulations=500, num_null=500)
    far = misspecification_test(model, guide, x_o + 3.0, num_simulations=500, num_null=500)
    if not args.quiet:
        print(f"misspecification p-value at x_o: {check.p_value.item():.3f}")
        print(f"misspecification p-value at x_o + 3: {far.p_value.item():.3f}")
        print(f"posterior mode (map): {posterior.map()['theta'].tolist()}")
    if args.out:
        plot(snapshots, Path(args.out))
    return history, snapshots, check.p_value.item(), far.p_value.item()


def plot(snapshots, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(snapshots), figsize=(2.6 * len(snapshots), 2.8))
    for i, (ax, theta) in enumerate(zip(axes, snapshots, strict=True)):
        ax.scatter(theta[:, 0], theta[:, 1], s=1, alpha=0.3)
        ax.set(xlim=(-1, 1), ylim=(-1, 1), title=f"after round {i + 1}", aspect="equal")
        ax.set_xticks([-1, 0, 1])
        ax.set_yticks([-1, 0, 1])
    fig.tight_layout()
    fig.savefig(out / "sequential_rounds.png", dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-simulations", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/sequential_inference")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
