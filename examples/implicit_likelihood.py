"""A black-box simulator, two likelihood-free losses: ForwardKL against AdversarialELBO.

Each datapoint is five draws of a Student-t (3 degrees of freedom) with an unknown location
and log-scale, simulated in numpy; neither loss evaluates the likelihood. The same amortized
flow guide is trained twice: with ``ForwardKL`` on fresh model simulations (maximum
likelihood of the latents, mass-covering), and with ``AdversarialELBO`` on a data set
(reverse KL through a discriminator's density ratio, mode-seeking). Only the evaluation uses
the Student-t density: for a few observations the exact posterior is computed on a grid and
compared with both guides (moments, and both KL directions by quadrature). The script prints
a table and plots the three posteriors.

    python examples/implicit_likelihood.py --num-steps 3000 --out outputs/implicit_likelihood
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import SVI

from pyro_jc import AdversarialELBO, AutoAmortizedFlow, ForwardKL, Implicit

DRAWS, DF = 5, 3.0
PRIOR = {"loc": (0.0, 1.0), "log_scale": (-0.5, 0.5)}
GRID = {"loc": (-4.0, 4.0), "log_scale": (-2.5, 1.5)}


def student_t_simulator(loc, log_scale):
    """The black box: numpy arrays ``(n,)`` in, ``(n, DRAWS)`` draws out."""
    noise = np.random.standard_t(DF, size=(loc.shape[0], DRAWS))
    return loc[:, None] + np.exp(log_scale)[:, None] * noise


def model(x):
    with pyro.plate("data", x.shape[0]):
        loc = pyro.sample("loc", dist.Normal(*map(x.new_tensor, PRIOR["loc"])))
        log_scale = pyro.sample("log_scale", dist.Normal(*map(x.new_tensor, PRIOR["log_scale"])))
        draws = Implicit(student_t_simulator, loc, log_scale, event_shape=(DRAWS,), numpy=True)
        return pyro.sample("x", draws, obs=x)


def make_guide():
    return AutoAmortizedFlow(model, transform="spline_coupling", num_transforms=4)


# -- training ----------------------------------------------------------------------------------


def optimizer(args):
    # Learning rate decayed tenfold over the run: it lets the adversarial game settle (and
    # is given to both losses alike).
    decay = 0.1 ** (1 / max(args.num_steps, 1))
    return pyro.optim.ClippedAdam({"lr": args.learning_rate, "lrd": decay})


def train_forward_kl(args, progress):
    guide = make_guide()
    svi = SVI(model, guide, optimizer(args), ForwardKL(num_particles=1))
    placeholder = torch.zeros(args.batch_size, DRAWS)  # one simulated data set of this size
    for _ in progress(range(args.num_steps), "ForwardKL"):
        svi.step(placeholder)
    return guide


def train_adversarial(args, data, progress):
    guide = make_guide()
    loss = AdversarialELBO(
        discriminator_steps=args.discriminator_steps, warmup_steps=args.warmup_steps
    )
    svi = SVI(model, guide, optimizer(args), loss)
    for _ in progress(range(args.num_steps), "AdversarialELBO"):
        svi.step(data[torch.randint(len(data), (args.batch_size,))])
    return guide


# -- evaluation on a grid ----------------------------------------------------------------------


def grid(n):
    loc = torch.linspace(*GRID["loc"], n)
    log_scale = torch.linspace(*GRID["log_scale"], n)
    mesh = torch.meshgrid(loc, log_scale, indexing="ij")
    cell = (loc[1] - loc[0]) * (log_scale[1] - log_scale[0])
    return mesh[0].reshape(-1), mesh[1].reshape(-1), cell


def exact_log_posterior(x, loc, log_scale):
    """Unnormalized, on the grid: the Student-t density is used here only."""
    t = dist.StudentT(DF, loc.unsqueeze(-1), log_scale.exp().unsqueeze(-1))
    log_lik = t.log_prob(x).sum(-1)
    log_prior = dist.Normal(*PRIOR["loc"]).log_prob(loc) + dist.Normal(
        *PRIOR["log_scale"]
    ).log_prob(log_scale)
    return log_lik + log_prior


@torch.no_grad()
def guide_log_density(guide, x, loc, log_scale):
    """``log q(z | x)`` on the grid: the guide's data plate runs over the grid points."""
    values = {"loc": loc, "log_scale": log_scale}
    trace = poutine.trace(poutine.condition(guide, values)).get_trace(x.expand(len(loc), DRAWS))
    trace.compute_log_prob()
    return sum(trace.nodes[name]["log_prob"] for name in values)


def normalize(log_p, cell):
    return log_p - torch.logsumexp(log_p, 0) - cell.log()


def compare(x, guides, n_grid):
    loc, log_scale, cell = grid(n_grid)
    log_p = normalize(exact_log_posterior(x, loc, log_scale), cell)
    p = log_p.exp() * cell
    rows = {"exact": moments(p, loc, log_scale)}
    for name, guide in guides.items():
        log_q = normalize(guide_log_density(guide, x, loc, log_scale), cell)
        q = log_q.exp() * cell
        rows[name] = moments(q, loc, log_scale)
        rows[name]["kl_exact_to_guide"] = (p * (log_p - log_q)).sum().item()  # forward KL
        rows[name]["kl_guide_to_exact"] = (q * (log_q - log_p)).sum().item()  # reverse KL
    return rows, (loc, log_scale, log_p)


def moments(weights, loc, log_scale):
    stats = {}
    for name, values in (("loc", loc), ("log_scale", log_scale)):
        mean = (weights * values).sum()
        stats[f"{name}_mean"] = mean.item()
        stats[f"{name}_sd"] = (weights * (values - mean) ** 2).sum().sqrt().item()
    return stats


# -- script ------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-data", type=int, default=20000, help="the adversarial guide's data")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--discriminator-steps", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--grid", type=int, default=200, help="grid points per latent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/implicit_likelihood")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(args):
    def progress(steps, desc):
        if args.quiet:
            return steps
        from tqdm.auto import tqdm

        return tqdm(steps, desc=desc)

    pyro.set_rng_seed(args.seed)
    np.random.seed(args.seed)
    true_latents = torch.tensor([[0.0, -0.5], [1.5, -1.0], [-1.0, 0.3]])
    x_show = torch.as_tensor(
        student_t_simulator(true_latents[:, 0].numpy(), true_latents[:, 1].numpy()),
        dtype=torch.get_default_dtype(),
    )
    with torch.no_grad():  # the adversarial guide's data set: draws from the model itself
        data = poutine.trace(poutine.uncondition(model)).get_trace(
            torch.zeros(args.num_data, DRAWS)
        )
        data = data.nodes["x"]["value"]

    # Evaluate each guide right after training: the two guides share parameter names in
    # Pyro's param store.
    results, seconds, posteriors = {}, {}, {}
    for name in ("ForwardKL", "AdversarialELBO"):
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        start = time.perf_counter()
        if name == "ForwardKL":
            guide = train_forward_kl(args, progress)
        else:
            guide = train_adversarial(args, data, progress)
        seconds[name] = time.perf_counter() - start
        for i, x in enumerate(x_show):
            rows, reference = compare(x, {name: guide}, args.grid)
            results.setdefault(i, {"exact": rows["exact"]})[name] = rows[name]
            posteriors.setdefault(i, {"exact": reference})
        with torch.no_grad():
            samples = guide.sample_posterior(x_show, num_samples=2000)
        posteriors["samples", name] = torch.stack([samples["loc"], samples["log_scale"]], -1)

    print_table(results, seconds, true_latents)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(posteriors, true_latents, out / "implicit_likelihood.png")
    print(f"\nplot: {out / 'implicit_likelihood.png'}")
    return {"results": results, "seconds": seconds}


def print_table(results, seconds, true_latents):
    print(
        f"\n{'obs':>3} {'method':<17} {'loc mean':>9} {'sd':>6} {'log_scale mean':>15} {'sd':>6}"
        f" {'KL(exact||q)':>13} {'KL(q||exact)':>13}"
    )
    for i, rows in results.items():
        for method, r in rows.items():
            kls = (
                f" {r['kl_exact_to_guide']:>13.3f} {r['kl_guide_to_exact']:>13.3f}"
                if method != "exact"
                else ""
            )
            print(
                f"{i:>3} {method:<17} {r['loc_mean']:>9.3f} {r['loc_sd']:>6.3f}"
                f" {r['log_scale_mean']:>15.3f} {r['log_scale_sd']:>6.3f}{kls}"
            )
    print("\ntraining seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print("true (loc, log_scale): " + ", ".join(f"({a:.1f}, {b:.1f})" for a, b in true_latents))


def plot(posteriors, true_latents, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(true_latents)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4), sharex=True, sharey=True)
    for i, ax in enumerate(axes):
        loc, log_scale, log_p = posteriors[i]["exact"]
        side = int(math.isqrt(len(loc)))
        ax.contour(
            loc.reshape(side, side),
            log_scale.reshape(side, side),
            log_p.exp().reshape(side, side),
            levels=6,
            colors="k",
            linewidths=0.8,
        )
        for name, color in (("ForwardKL", "C0"), ("AdversarialELBO", "C1")):
            s = posteriors["samples", name][:500, i]
            ax.scatter(s[:, 0], s[:, 1], s=3, alpha=0.3, color=color, label=name)
        ax.plot(*true_latents[i].tolist(), "r*", ms=10, label="true")
        ax.set_title(f"observation {i}")
        ax.set_xlabel("loc")
    axes[0].set_ylabel("log_scale")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(parse_args())
