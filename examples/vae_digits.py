"""A VAE on scikit-learn's bundled 8x8 digits, trained with JointContrastiveELBO.

The only change from a Pyro VAE is ``loss=JointContrastiveELBO(...)``; in return the loss
reports the rate/distortion decomposition every step, and the held-out evaluation prints the
ELBO, its decomposition ``rate = I_q(x; z) + KL[q(z) || p(z)]`` and an importance-weighted
log-evidence estimate. It saves reconstructions and the latent space as a PNG.

    python examples/vae_digits.py --num-epochs 200
"""

import argparse
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.nn import PyroModule
from torch import nn
from tqdm import trange

from pyro_jc import JointContrastiveELBO, JointContrastiveIWELBO


def load_digits(device):
    """Binarized 8x8 digits (1797 images), split 1500 train / 297 test, and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data > 7, dtype=torch.float32, device=device)
    y = torch.as_tensor(data.target, device=device)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
    x, y = x[perm], y[perm]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class VAE(PyroModule):
    """Bernoulli decoder ``p(x | z)`` with a standard normal prior, and a Gaussian encoder."""

    def __init__(self, x_dim=64, z_dim=2, hidden=128):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = mlp([z_dim, hidden, hidden, x_dim])
        self.encoder = mlp([x_dim, hidden, hidden, 2 * z_dim])

    def model(self, x, batch_size=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            prior = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            z = pyro.sample("z", prior)
            logits = self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x[idx])

    def guide(self, x, batch_size=None):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            loc, log_scale = self.encoder(x[idx]).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def encode(self, x):
        return self.encoder(x).chunk(2, -1)[0]

    def reconstruct(self, x):
        return torch.sigmoid(self.decoder(self.encode(x)))


def evaluate(vae, x):
    """Held-out ELBO and decomposition (one full batch), and the IW log evidence."""
    elbo = JointContrastiveELBO(
        num_particles=32, vectorize_particles=True, estimate_information=True
    )
    with torch.no_grad():
        elbo.loss(vae.model, vae.guide, x)
        iw = JointContrastiveIWELBO(num_particles=256)
        log_evidence = iw.log_evidence(vae.model, vae.guide, x).mean().item()
    return dict(elbo.diagnostics, log_evidence_iw256=log_evidence)


def plot(vae, x, y, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        recon = vae.reconstruct(x[:10]).cpu().numpy()
        z = vae.encode(x).cpu().numpy()
    images, labels = x.cpu().numpy(), y.cpu().numpy()
    fig = plt.figure(figsize=(12, 5))
    grid = fig.add_gridspec(2, 12)
    for i in range(10):
        for row, img in enumerate((images[i], recon[i])):
            ax = fig.add_subplot(grid[row, i])
            ax.imshow(img.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.axis("off")
    fig.text(0.02, 0.72, "data", rotation=90)
    fig.text(0.02, 0.25, "recon.", rotation=90)
    ax = fig.add_axes([0.72, 0.1, 0.26, 0.8])
    points = ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=6)
    ax.set_title("held-out latent means")
    fig.colorbar(points, ax=ax, ticks=range(10))
    fig.subplots_adjust(left=0.04, right=0.68)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args):
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    device = torch.device("cuda" if args.cuda else "cpu")
    (x_train, _), (x_test, y_test) = load_digits(device)
    vae = VAE(z_dim=args.z_dim).to(device)
    elbo = JointContrastiveELBO(beta=args.beta)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.learning_rate}), loss=elbo)

    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    progress = trange(args.num_epochs, desc="epochs", disable=args.quiet)
    for _ in progress:
        totals = {"elbo": 0.0, "reconstruction": 0.0, "rate": 0.0}
        for _ in range(steps_per_epoch):
            svi.step(x_train, args.batch_size)
            for key in totals:
                totals[key] += elbo.diagnostics[key] / steps_per_epoch
        progress.set_postfix({k: f"{v:.2f}" for k, v in totals.items()})

    results = evaluate(vae, x_test)
    print(f"held-out results ({len(x_test)} digits, nats per digit):")
    for key in ("elbo", "reconstruction", "rate", "mutual_information", "marginal_kl"):
        print(f"  {key:<20s} {results[key]:9.3f}")
    print(f"  {'log p(x) (IW, K=256)':<20s} {results['log_evidence_iw256']:9.3f}")
    gap = results["rate"] - results["mutual_information"] - results["marginal_kl"]
    print(f"  check: rate - (MI + marginal KL) = {gap:.2e}")
    path = Path(args.out) / "vae_digits.png"
    plot(vae, x_test, y_test, path)
    print(f"saved reconstructions and latent plot to {path}")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--z-dim", type=int, default=2)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda", action="store_true", help="train on the GPU")
    parser.add_argument("--out", default="outputs/vae_digits")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
