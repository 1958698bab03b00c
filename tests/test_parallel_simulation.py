"""simulate in worker processes (joblib): the same bank as in one process, failures that
keep the finished chunks, the param store shipped to the workers."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_jc import Implicit, SimulatorError, simulate

pytest.importorskip("joblib")


def numpy_model(threshold=math.inf, on_invalid="drop"):
    """A numpy simulator, one draw per call, that raises for theta > threshold."""

    def simulator(theta):
        if theta > threshold:
            raise ValueError(f"no solution at {theta}")
        return theta + np.random.randn(2)

    def model(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        sim = Implicit(
            simulator, theta, event_shape=(2,), vectorized=False, numpy=True, on_invalid=on_invalid
        )
        pyro.sample("x", sim, obs=x)

    return model


def test_workers_give_the_bank_of_one_process():
    """Each chunk has its own seed (torch's and numpy's): the bank does not depend on the
    number of workers, draws dropped as invalid included."""
    model = numpy_model(threshold=1.0)  # about 16% of the draws raise and are dropped
    banks = []
    for workers in (1, 2):
        pyro.set_rng_seed(0)
        with pytest.warns(UserWarning, match="dropped"):
            banks.append(
                simulate(
                    model, torch.zeros(2), num_simulations=300, batch_size=40, num_workers=workers
                )
            )
    one, two = banks
    assert one["num_invalid"] == two["num_invalid"] > 0
    for part in ("latents", "observations"):
        for name in one[part]:
            assert torch.equal(one[part][name], two[part][name])
    assert one["latents"]["theta"].shape == (300,) and bool((one["latents"]["theta"] <= 1).all())


def test_a_worker_failure_keeps_the_finished_chunks():
    model = numpy_model(threshold=3.0, on_invalid="raise")  # 6.5% of chunks of 50 fail
    pyro.set_rng_seed(1)
    with pytest.raises(SimulatorError, match=r"stopped in chunk \d+ .*no solution") as info:
        simulate(model, torch.zeros(2), num_simulations=4000, batch_size=50, num_workers=2)
    kept = info.value.simulations
    assert kept is not None and kept["latents"]["theta"].shape[0] % 50 == 0
    assert bool((kept["latents"]["theta"] <= 3.0).all())


def test_workers_see_the_param_store():
    def model(x):
        shift = pyro.param("shift", torch.tensor(0.0))
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(theta + shift, 0.01), obs=x)

    pyro.param("shift", torch.tensor(100.0))
    bank = simulate(model, torch.zeros(()), num_simulations=20, batch_size=10, num_workers=2)
    assert torch.allclose(
        bank["observations"]["x"] - bank["latents"]["theta"], torch.full((20,), 100.0), atol=0.1
    )


def test_num_workers_is_checked():
    with pytest.raises(ValueError, match="num_workers"):
        simulate(numpy_model(), torch.zeros(2), num_simulations=10, num_workers=0)


def test_workers_write_the_store_of_one_process(tmp_path):
    model = numpy_model(threshold=1.0)
    banks = []
    for workers in (1, 2):
        pyro.set_rng_seed(3)
        with pytest.warns(UserWarning, match="dropped"):
            banks.append(
                simulate(
                    model,
                    torch.zeros(2),
                    num_simulations=200,
                    batch_size=40,
                    num_workers=workers,
                    path=tmp_path / str(workers),
                )
            )
    assert torch.equal(banks[0]["observations"]["x"], banks[1]["observations"]["x"])


def test_a_missing_joblib_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_joblib(name, *args, **kwargs):
        if name == "joblib":
            raise ImportError("No module named 'joblib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_joblib)
    with pytest.raises(ImportError, match=r"pyro-jc\[parallel\]"):
        simulate(numpy_model(), torch.zeros(2), num_simulations=10, num_workers=2)


def test_forward_kl_trains_on_pairs_simulated_in_workers():
    """ForwardKL(num_workers=2): fresh pairs come from worker processes ahead of the steps,
    and the guide learns the exact posterior (x_i ~ N(theta, 1), i = 1..3, theta ~ N(0, 1):
    theta | x ~ N(sum x / 4, 1 / 4))."""
    from pyro.infer import SVI

    from pyro_jc import AutoAmortizedNormal, ForwardKL
    from pyro_jc import optim as jc_optim

    def model(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            sim = Implicit(lambda t: t + np.random.randn(*t.shape), theta, numpy=True)
            pyro.sample("x", sim, obs=x)

    pyro.set_rng_seed(0)
    loss = ForwardKL(num_particles=256, num_workers=2)
    guide = AutoAmortizedNormal(model)
    svi = SVI(model, guide, jc_optim.Adam({"lr": 1e-2}), loss)
    for _ in range(400):
        svi.step(torch.zeros(3))
    x = torch.tensor([0.5, 1.0, 1.5])
    theta = guide.sample_posterior(x, num_samples=4000)["theta"]
    assert abs(theta.mean().item() - 0.75) < 0.1 and abs(theta.std().item() - 0.5) < 0.05
    loss._stream[1].close()


def test_simulate_with_workers_after_a_simulation_stream():
    """A SimulationStream (ForwardKL(num_workers=...)) and simulate(num_workers=...) share
    joblib's reusable executor: either may come first in a process (simulate after a stream
    failed in joblib's reducers when the stream took loky's executor directly)."""
    from pyro_jc.simulation import SimulationStream

    model = numpy_model()
    stream = SimulationStream(model, (torch.zeros(2),), {}, 10, 0, num_workers=2)
    z, x, _ = next(stream)
    stream.close()
    assert x["x"].shape == (10, 2)
    bank = simulate(model, torch.zeros(2), num_simulations=60, batch_size=20, num_workers=2)
    assert bank["observations"]["x"].shape == (60, 2)


def test_simulation_workers_need_vectorized_particles():
    from pyro_jc import ForwardKL

    with pytest.raises(ValueError, match="vectorize_particles=True"):
        ForwardKL(num_workers=2, vectorize_particles=False)
    with pytest.raises(ValueError, match="num_workers"):
        ForwardKL(num_workers=0)


@pytest.mark.slow
def test_a_dask_cluster_gives_the_bank_of_one_process():
    """Under joblib's dask backend the chunks run on a dask.distributed cluster (here a
    LocalCluster of two processes): the same bank as in this process."""
    distributed = pytest.importorskip("distributed")
    from joblib import parallel_config

    model = numpy_model(threshold=1.0)
    pyro.set_rng_seed(5)
    with pytest.warns(UserWarning, match="dropped"):
        local = simulate(model, torch.zeros(2), num_simulations=200, batch_size=50)
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        with distributed.Client(cluster), parallel_config(backend="dask"):
            pyro.set_rng_seed(5)
            with pytest.warns(UserWarning, match="dropped"):
                remote = simulate(
                    model, torch.zeros(2), num_simulations=200, batch_size=50, num_workers=2
                )
    finally:
        cluster.close()
    assert torch.equal(local["observations"]["x"], remote["observations"]["x"])
    assert local["num_invalid"] == remote["num_invalid"]


@pytest.mark.slow
def test_a_ray_cluster_gives_the_bank_of_one_process():
    """Under Ray's joblib backend (which returns whole lists, not generators) the chunks run
    in waves on a local Ray instance: the same bank as in this process, and a failure keeps
    the finished waves."""
    ray = pytest.importorskip("ray")
    from joblib import parallel_config
    from ray.util.joblib import register_ray

    model = numpy_model(threshold=1.0)
    pyro.set_rng_seed(6)
    with pytest.warns(UserWarning, match="dropped"):
        local = simulate(model, torch.zeros(2), num_simulations=200, batch_size=25)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        register_ray()
        with parallel_config(backend="ray"):
            pyro.set_rng_seed(6)
            with pytest.warns(UserWarning, match="dropped"):
                remote = simulate(
                    model, torch.zeros(2), num_simulations=200, batch_size=25, num_workers=2
                )
            # 1.3% of chunks of 10 fail: most waves of 8 chunks finish
            failing = numpy_model(threshold=3.0, on_invalid="raise")
            pyro.set_rng_seed(1)
            with pytest.raises(SimulatorError, match="no solution") as info:
                simulate(
                    failing, torch.zeros(2), num_simulations=4000, batch_size=10, num_workers=2
                )
    finally:
        ray.shutdown()
    assert torch.equal(local["observations"]["x"], remote["observations"]["x"])
    assert local["num_invalid"] == remote["num_invalid"]
    kept = info.value.simulations
    assert kept is not None and kept["latents"]["theta"].shape[0] % 80 == 0
    assert bool((kept["latents"]["theta"] <= 3.0).all())


def test_workers_simulate_at_given_latents():
    """simulate(latents=..., num_workers=2): each worker gets its chunk's latents; the bank
    is the one of one process."""
    from pyro_jc.joints import prior_latents

    model = numpy_model()
    latents = prior_latents(model, (torch.zeros(2),), {}, 120, 0)
    banks = []
    for workers in (1, 2):
        pyro.set_rng_seed(4)
        banks.append(
            simulate(
                model,
                torch.zeros(2),
                num_simulations=120,
                batch_size=50,
                num_workers=workers,
                latents=latents,
            )
        )
    assert torch.equal(banks[0]["latents"]["theta"], latents["theta"])
    assert torch.equal(banks[1]["latents"]["theta"], latents["theta"])
    assert torch.equal(banks[0]["observations"]["x"], banks[1]["observations"]["x"])
