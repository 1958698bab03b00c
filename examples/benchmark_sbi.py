"""Neural posterior estimation against the sbi package on sbibm tasks (accuracy and speed).

Each sbibm task is written as an ordinary Pyro model whose likelihood is sbibm's own
simulator used as a black box (``pyro_jc.Implicit``). Both sides use the same network family
(5 flow layers with 50 hidden units: neural spline flows by default, ``--flow maf`` for
masked affine ones; z-scored inputs) and sbi's training defaults (batch 200, learning rate
5e-4, 10% validation, patience 20, gradient clipping at 5). pyro_jc ends its flow on the box
priors with ``interval_transform="box"``; sbi rejects samples outside the box.

* bank mode: per task, budget and seed (``--seeds``), one bank of ``N`` simulations given to
  both ``sbi.inference.NPE`` and ``pyro_jc.ForwardKL(simulations=bank)``; training wall time
  of each and the C2ST (sbibm's published metric) of 10 reference posteriors, averaged over
  observations and seeds;
* fresh-simulation mode: a fixed wall-clock budget. pyro_jc trains ``ForwardKL`` on fresh
  simulations each step until the budget is spent (``loss.fit(svi, x, seconds=...)``: 1000
  per step, learning rate 4e-3 annealed by a cosine over the budget; new simulations cannot
  be overfit); sbi, which needs its simulations up front,
  gets the largest of N = 1000, 2000, 4000, ... whose simulate-and-train run fits the budget
  (an oracle choice in sbi's favour).

Sides alternate which goes first; everything runs on one thread. Setup::

    pip install -e ".[benchmark]" && pip install --no-deps sbibm==1.1.0   # or: make benchmark
    python examples/benchmark_sbi.py --c2st-samples 10000   # the published C2ST protocol
"""

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI  # noqa: E402

from pyro_jc import AutoAmortizedFlow, ForwardKL, Implicit, optim, simulate  # noqa: E402

#: sbi NPE's published mean C2ST (Lueckmann et al. 2021, sbibm), budgets 1k and 10k.
PUBLISHED_NPE = {
    "gaussian_linear": {1000: 0.694, 10000: 0.552},
    "two_moons": {1000: 0.725, 10000: 0.606},
}
NUM_TRANSFORMS, HIDDEN = 5, 50


def _zuko_nsf(features, context):
    import zuko

    return zuko.flows.NSF(
        features, context, transforms=NUM_TRANSFORMS, hidden_features=(HIDDEN, HIDDEN), bins=10
    )


#: Each flow: (sbi's density_estimator, pyro_jc's AutoAmortizedFlow arguments); 5 layers of
#: width 50. Box priors end pyro_jc's own flows with a clamp that leaves the interior as it
#: is, then a spline of the box onto itself for posteriors cut by a face (sbi models theta
#: itself and rejects samples that leak out of the box; this guide cannot leak); zuko's flow
#: (``zuko_nsf``, pyro_jc's guide with ``flow=``) takes the soft clamp alone.
FLOWS = {
    "maf": ("maf", {"transform": "affine_autoregressive", "interval_transform": "box"}),
    "nsf": ("nsf", {"transform": "spline_autoregressive", "interval_transform": "box"}),
    "zuko_nsf": ("nsf", {"flow": _zuko_nsf, "interval_transform": "soft"}),
}
BATCH_SIZE, LEARNING_RATE, PATIENCE = 200, 5e-4, 20


def task_model(task):
    """The sbibm task as a Pyro model: its prior, and its simulator as a black box."""
    prior = task.get_prior_dist()
    simulator = task.get_simulator()  # batched: (n, dim_parameters) -> (n, dim_data)

    def model(x):
        theta = pyro.sample("parameters", prior)
        data = Implicit(simulator, theta, event_shape=(task.dim_data,), param_event_dims=1)
        return pyro.sample("data", data, obs=x)

    return model


def make_guide(model, flow):
    return AutoAmortizedFlow(
        model,
        num_transforms=NUM_TRANSFORMS,
        flow_hidden_dims=(HIDDEN, HIDDEN),
        count_bins=10,  # as sbi's nsf (10 bins); pyro_jc's default interval (5, sbi's is 3)
        bound=5.0,
        embedding=torch.nn.Identity(),  # as sbi: the flow is conditioned on z-scored x
        **FLOWS[flow][1],
    )


# -- the two sides -----------------------------------------------------------------------------


def train_pyro_jc_bank(model, x0, bank, flow):
    guide = make_guide(model, flow)
    loss = ForwardKL(num_particles=BATCH_SIZE, simulations=bank)
    svi = SVI(model, guide, optim.Adam({"lr": LEARNING_RATE}), loss)
    start = time.perf_counter()
    history = loss.fit(svi, x0, patience=PATIENCE)
    return guide, time.perf_counter() - start, history["epochs"]


def train_pyro_jc_fresh(model, x0, seconds, flow, batch_size, learning_rate):
    guide = make_guide(model, flow)
    loss = ForwardKL(num_particles=batch_size)
    svi = SVI(model, guide, optim.Adam({"lr": learning_rate}), loss)
    history = loss.fit(svi, x0, seconds=seconds)  # the learning rate anneals over the budget
    return guide, history["simulations"]


def train_sbi(task, theta, x, flow):
    from sbi.inference import NPE
    from sbi.neural_nets import posterior_nn

    estimator = posterior_nn(FLOWS[flow][0], hidden_features=HIDDEN, num_transforms=NUM_TRANSFORMS)
    inference = NPE(
        prior=task.get_prior_dist(),
        density_estimator=estimator,
        show_progress_bars=False,
        tracker=_NoTracker(),
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # sbi prints a line when it converges
        inference.append_simulations(theta, x).train(
            training_batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, stop_after_epochs=PATIENCE
        )
    seconds = time.perf_counter() - start
    return inference.build_posterior(), seconds, inference.summary["epochs_trained"][-1]


class _NoTracker:
    """Stands in for sbi's tensorboard tracker (which would write an ``sbi-logs`` folder)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def train_sbi_fresh(task, seconds, flow):
    """The largest doubling budget whose simulate-and-train run fits in ``seconds``."""
    best, num = None, 1000
    while True:
        start = time.perf_counter()
        theta = task.get_prior()(num_samples=num)
        x = task.get_simulator()(theta)
        posterior, _, _ = train_sbi(task, theta, x, flow)
        if time.perf_counter() - start > seconds:
            return best
        best, num = (posterior, num), 2 * num


def pyro_jc_samples(guide, x, n):
    return guide.sample_posterior(x, num_samples=n)["parameters"]


def sbi_samples(posterior, x, n):
    return posterior.sample((n,), x=x, show_progress_bars=False)


# -- one task ----------------------------------------------------------------------------------


def c2st_per_observation(task, draw, observations, n):
    from sbibm.metrics import c2st

    scores = []
    for i in observations:
        reference = task.get_reference_posterior_samples(num_observation=i)[:n]
        samples = draw(task.get_observation(num_observation=i)[0], n)
        scores.append(float(c2st(reference, samples)))
    return scores


def bank_mode(task, model, budget, seed, observations, args, order):
    pyro.set_rng_seed(seed)
    x0 = task.get_observation(num_observation=1)[0]
    bank = simulate(model, x0, num_simulations=budget)
    theta, x = bank["latents"]["parameters"], bank["observations"]["data"]
    row = {"task": task.name, "budget": budget, "seed": seed}
    for side in order:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        if side == "pyro_jc":
            guide, seconds, epochs = train_pyro_jc_bank(model, x0, bank, args.flow)
            draw = lambda xo, n, g=guide: pyro_jc_samples(g, xo, n)  # noqa: E731
        else:
            posterior, seconds, epochs = train_sbi(task, theta, x, args.flow)
            draw = lambda xo, n, p=posterior: sbi_samples(p, xo, n)  # noqa: E731
        scores = c2st_per_observation(task, draw, observations, args.c2st_samples)
        row[side] = {"seconds": seconds, "epochs": epochs, "c2st": scores}
    return row


def fresh_mode(task, model, seed, observations, args, order):
    x0 = task.get_observation(num_observation=1)[0]
    row = {"task": task.name, "seconds": args.fresh_seconds, "seed": seed}
    for side in order:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        if side == "pyro_jc":
            guide, sims = train_pyro_jc_fresh(
                model,
                x0,
                args.fresh_seconds,
                args.flow,
                args.fresh_batch_size,
                args.fresh_learning_rate,
            )
            draw = lambda xo, n, g=guide: pyro_jc_samples(g, xo, n)  # noqa: E731
        else:
            fitted = train_sbi_fresh(task, args.fresh_seconds, args.flow)
            if fitted is None:
                row[side] = {"simulations": 0, "c2st": [math.nan]}
                continue
            posterior, sims = fitted
            draw = lambda xo, n, p=posterior: sbi_samples(p, xo, n)  # noqa: E731
        scores = c2st_per_observation(task, draw, observations, args.c2st_samples)
        row[side] = {"simulations": sims, "c2st": scores}
    return row


# -- reporting ---------------------------------------------------------------------------------


def mean(xs):
    return statistics.fmean(xs)


def bank_table(rows):
    """One line per task and budget: C2ST averaged over observations and seeds, training
    seconds summed over seeds."""
    lines = [
        f"{'task':16} {'sims':>6} {'seeds':>5} {'C2ST pyro_jc':>13} {'C2ST sbi':>9} "
        f"{'published':>9} {'train s pyro_jc':>16} {'train s sbi':>12} {'time ratio':>11}"
    ]
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["budget"]), []).append(r)
    for (task, budget), group in groups.items():
        ours = [score for r in group for score in r["pyro_jc"]["c2st"]]
        sbi = [score for r in group for score in r["sbi"]["c2st"]]
        ours_s = sum(r["pyro_jc"]["seconds"] for r in group)
        sbi_s = sum(r["sbi"]["seconds"] for r in group)
        lines.append(
            f"{task:16} {budget:>6} {len(group):>5} {mean(ours):>13.3f} {mean(sbi):>9.3f} "
            f"{PUBLISHED_NPE[task].get(budget, math.nan):>9.3f} "
            f"{ours_s:>16.1f} {sbi_s:>12.1f} {ours_s / sbi_s:>11.2f}"
        )
    return "\n".join(lines)


def fresh_table(rows):
    """One line per task: C2ST averaged over observations and seeds, simulations per seed
    (mean)."""
    lines = [
        f"{'task':16} {'budget s':>9} {'seeds':>5} {'C2ST pyro_jc':>13} {'sims pyro_jc':>13} "
        f"{'C2ST sbi':>9} {'sims sbi':>9}"
    ]
    groups = {}
    for r in rows:
        groups.setdefault(r["task"], []).append(r)
    for task, group in groups.items():
        c2st = {side: [x for r in group for x in r[side]["c2st"]] for side in ("pyro_jc", "sbi")}
        sims = {side: mean([r[side]["simulations"] for r in group]) for side in ("pyro_jc", "sbi")}
        lines.append(
            f"{task:16} {group[0]['seconds']:>9.0f} {len(group):>5} "
            f"{mean(c2st['pyro_jc']):>13.3f} {sims['pyro_jc']:>13.0f} "
            f"{mean(c2st['sbi']):>9.3f} {sims['sbi']:>9.0f}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["gaussian_linear", "two_moons"])
    p.add_argument("--budgets", nargs="*", type=int, default=[1000, 10000], help="none: skip")
    p.add_argument("--observations", nargs="+", type=int, default=list(range(1, 11)))
    p.add_argument("--fresh-seconds", type=float, default=60.0, help="0 skips fresh mode")
    # Fresh simulations cannot be overfit: larger batches and a larger step than sbi's (the
    # step anneals to a thousandth of it over the budget).
    p.add_argument("--fresh-batch-size", type=int, default=1000)
    p.add_argument("--fresh-learning-rate", type=float, default=4e-3)
    p.add_argument("--c2st-samples", type=int, default=10000, help="10000 is sbibm's protocol")
    p.add_argument("--flow", choices=sorted(FLOWS), default="nsf")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="repeats, each with its own bank"
    )
    p.add_argument("--out", default="outputs/benchmark_sbi")
    return p.parse_args(argv)


def main(args):
    import sbibm

    torch.set_num_threads(1)
    # A torch optimizer's first construction imports torch._dynamo (about a second): pay it
    # here, not in whichever side trains first.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    bank_rows, fresh_rows, k = [], [], 0
    for name in args.tasks:
        task = sbibm.get_task(name)
        model = task_model(task)
        for budget in args.budgets:
            for seed in args.seeds:
                order = ("pyro_jc", "sbi") if k % 2 == 0 else ("sbi", "pyro_jc")
                row = bank_mode(task, model, budget, seed, args.observations, args, order)
                bank_rows.append(row)
                k += 1
                print(f"seed {seed}:", bank_table([row]).splitlines()[-1], flush=True)
        for seed in args.seeds if args.fresh_seconds > 0 else []:
            order = ("pyro_jc", "sbi") if k % 2 == 0 else ("sbi", "pyro_jc")
            row = fresh_mode(task, model, seed, args.observations, args, order)
            fresh_rows.append(row)
            k += 1
            print(f"seed {seed}:", fresh_table([row]).splitlines()[-1], flush=True)
    print(
        f"\nBank mode (mean C2ST over observations {args.observations} and seeds "
        f"{args.seeds}, {args.c2st_samples} samples per side)"
    )
    print(bank_table(bank_rows))
    if fresh_rows:
        print(f"\nFresh-simulation mode ({args.fresh_seconds:.0f} s wall clock per side)")
        print(fresh_table(fresh_rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"bank": bank_rows, "fresh": fresh_rows}, indent=1)
    )
    return bank_rows, fresh_rows


if __name__ == "__main__":
    main(parse_args())
