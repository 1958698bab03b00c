"""Data-parallel training with torch.distributed (DistributedOptim, torchrun)."""

import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
from pyro.infer import SVI, Trace_ELBO

from pyro_jc import optim
from pyro_jc.distributed import DistributedOptim

ROOT = Path(__file__).resolve().parents[1]


def test_distributed_optim_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedOptim(optim.Adam({"lr": 0.1}))


def test_in_a_group_of_one_it_steps_as_the_wrapped_optimizer(tmp_path):
    """World size 1: the average of one gradient is the gradient, so the parameters follow
    exactly the path of the unwrapped optimizer."""

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(1.0))
        pyro.sample("z", dist.Normal(loc, 0.5))

    paths = []
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for wrap in (False, True):
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            adam = optim.Adam({"lr": 0.1})
            svi = SVI(model, guide, DistributedOptim(adam) if wrap else adam, Trace_ELBO())
            for _ in range(5):
                svi.step()
            paths.append(pyro.param("loc").item())
    finally:
        tdist.destroy_process_group()
    assert paths[0] == paths[1] != 1.0


@pytest.mark.slow
def test_torchrun_with_two_processes_trains_as_one():
    """examples/distributed_training.py under torchrun: the ranks end with the same guide
    and its accuracy is that of one process with all the pairs (mean error within 0.25
    posterior sd, sd ratio within 10%)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "examples" / "distributed_training.py"),
        "--steps",
        "800",
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    processes, pairs, steps, _, mean_error, sd_ratio, agree = out.stdout.splitlines()[-1].split()
    assert (processes, pairs, steps, agree) == ("2", "256", "800", "True")
    assert float(mean_error) < 0.25 and abs(float(sd_ratio) - 1) < 0.1


def torchrun(script, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_shares_a_bank_on_disk(tmp_path):
    """--bank: rank 0 simulates a store, each rank trains on its own chunks with early
    stopping on the whole validation split; the ranks stop at the same epoch with the same
    guide, as accurate as one process."""
    out = torchrun(
        ROOT / "examples" / "distributed_training.py", "--bank", "8000", "--store", tmp_path / "b"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    processes, pairs, epochs, _, mean_error, sd_ratio, agree = out.stdout.splitlines()[-1].split()
    assert (processes, pairs, agree) == ("2", "256", "True") and int(epochs) > 5
    assert float(mean_error) < 0.25 and abs(float(sd_ratio) - 1) < 0.1


SPLIT_APART = """
import pyro, torch, torch.distributed as dist
from pyro_jc import ForwardKL, simulate
from pyro_jc.testing import LinearGaussianModel

dist.init_process_group("gloo")
problem = LinearGaussianModel.random(1, 1, num_data=1, seed=0)
pyro.set_rng_seed(0)
bank = simulate(problem.model, problem.data, num_simulations=200)
pyro.set_rng_seed(dist.get_rank())  # each rank its own split: refused
try:
    ForwardKL(simulations=bank, shard=(dist.get_rank(), 2))
except ValueError as e:
    print("refused:", "split the bank differently" in str(e))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_that_split_a_bank_apart_are_refused(tmp_path):
    script = tmp_path / "split_apart.py"
    script.write_text(SPLIT_APART)
    out = torchrun(script, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("True") == 2 and "False" not in out.stdout  # lines may interleave
