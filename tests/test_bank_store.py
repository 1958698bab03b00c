"""Banks on disk (simulate(path=...)): written chunk by chunk, resumed after an interrupt,
grown, checked against the model, read without unpickling."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_jc import Implicit, simulate
from pyro_jc.store import BankStore


def counting_model(calls, interrupt_at=None):
    """theta ~ N(0, 1); x_i ~ theta + N(0, 1) for the data's points, through a numpy
    simulator that counts its calls (and raises KeyboardInterrupt at call interrupt_at)."""

    def simulator(theta):
        calls[0] += 1
        if calls[0] == interrupt_at:
            raise KeyboardInterrupt
        return theta + np.random.randn(*theta.shape)

    def model(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("x", Implicit(simulator, theta, numpy=True), obs=x)

    return model


def simple_model(x):
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(()), 1.0))  # on the data device
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("x", dist.Normal(theta, 1.0), obs=x)


def test_a_second_call_reads_the_store_without_simulating(tmp_path):
    calls = [0]
    model = counting_model(calls)
    pyro.set_rng_seed(0)
    first = simulate(model, torch.zeros(3), num_simulations=250, batch_size=50, path=tmp_path)
    assert calls[0] == 5 and first["latents"]["theta"].shape == (250, 1)
    again = simulate(model, torch.zeros(3), num_simulations=250, path=tmp_path)
    assert calls[0] == 5  # nothing simulated
    for part in ("latents", "observations"):
        for k in first[part]:
            assert torch.equal(first[part][k], again[part][k])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sites"] == {"latents": {"theta": []}, "observations": {"x": [3]}}
    assert sorted(manifest["chunks"]) == ["0", "1", "2", "3", "4"]


def test_an_interrupted_store_resumes_to_the_uninterrupted_bank(tmp_path):
    pyro.set_rng_seed(1)
    whole = simulate(
        counting_model([0]),
        torch.zeros(3),
        num_simulations=400,
        batch_size=100,
        path=tmp_path / "whole",
    )
    base_seed = BankStore.open(tmp_path / "whole").base_seed
    # The same seed, interrupted at the third chunk, then resumed.
    calls = [0]
    pyro.set_rng_seed(1)
    with pytest.warns(UserWarning, match=r"interrupted: returning the 200 of 400.*call again"):
        part = simulate(
            counting_model(calls, interrupt_at=3),
            torch.zeros(3),
            num_simulations=400,
            batch_size=100,
            path=tmp_path / "cut",
        )
    assert part["latents"]["theta"].shape == (200, 1)
    store = BankStore.open(tmp_path / "cut")
    assert store.base_seed == base_seed and sorted(store.chunks) == [0, 1]
    resumed = simulate(
        counting_model([0]), torch.zeros(3), num_simulations=400, path=tmp_path / "cut"
    )
    assert torch.equal(resumed["latents"]["theta"], whole["latents"]["theta"])
    assert torch.equal(resumed["observations"]["x"], whole["observations"]["x"])
    assert (
        torch.allclose(resumed["observations"]["x"], whole["observations"]["x"], atol=0, rtol=0)
        or True
    )


def test_growing_a_store_keeps_its_bank(tmp_path):
    pyro.set_rng_seed(2)
    small = simulate(
        simple_model, torch.zeros(3), num_simulations=150, batch_size=100, path=tmp_path
    )
    large = simulate(simple_model, torch.zeros(3), num_simulations=450, path=tmp_path)
    assert large["latents"]["theta"].shape == (450, 1)
    assert torch.equal(large["latents"]["theta"][:150], small["latents"]["theta"])
    assert sorted(BankStore.open(tmp_path).chunks) == [0, 1, 2, 3, 4]


def test_a_store_of_another_model_or_size_is_refused(tmp_path):
    simulate(simple_model, torch.zeros(3), num_simulations=100, path=tmp_path)
    with pytest.raises(ValueError, match="another model or data-set size"):
        simulate(simple_model, torch.zeros(5), num_simulations=100, path=tmp_path)

    def renamed(x):
        phi = pyro.sample("phi", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("x", dist.Normal(phi, 1.0), obs=x)

    with pytest.raises(ValueError, match="another model"):
        simulate(renamed, torch.zeros(3), num_simulations=100, path=tmp_path)
    with pytest.raises(ValueError, match="chunks of 100"):
        simulate(simple_model, torch.zeros(3), num_simulations=100, batch_size=7, path=tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        simulate(simple_model, torch.zeros(3), num_simulations=10, path=tmp_path / "other")


def test_store_files_load_without_unpickling(tmp_path):
    simulate(simple_model, torch.zeros(3), num_simulations=100, path=tmp_path)
    chunk = torch.load(tmp_path / "chunk-00000000.pt", weights_only=True)
    assert set(chunk) == {"latents", "observations"} and chunk["observations"]["x"].shape == (
        100,
        3,
    )


def test_a_bank_on_disk_trains_a_chunk_at_a_time(tmp_path):
    """ForwardKL(simulations=store) reads the bank through a DataLoader a few chunks at a
    time: each chunk file once per pass over the bank, never all of them in memory, and the
    guide learns the posterior (theta | x ~ N(sum x / (n + 1), 1 / (n + 1)), n = 3)."""
    from pyro.infer import SVI

    from pyro_jc import AutoAmortizedNormal, ForwardKL
    from pyro_jc.simulation import StoredBank, batches

    pyro.set_rng_seed(0)
    simulate(simple_model, torch.zeros(3), num_simulations=4000, batch_size=200, path=tmp_path)
    bank = StoredBank(BankStore.open(tmp_path), cache_chunks=2)
    loss = ForwardKL(num_particles=200, simulations=bank)
    assert len(loss.bank) == 3600 and len(loss.validation_bank) == 400  # 18 + 2 chunks
    guide = AutoAmortizedNormal(simple_model)
    svi = SVI(simple_model, guide, pyro.optim.Adam({"lr": 1e-2}), loss)
    for _ in range(3 * loss.steps_per_epoch):
        svi.step(torch.zeros(3))
    assert len(loss.bank._cache) <= 2  # never more than the cache in memory
    # A shuffled pass reads each chunk file once.
    before = loss.bank.reads
    assert sum(len(b[1]["x"]) for b in batches(loss.bank, 200, shuffle=True)) == 3600
    assert loss.bank.reads - before == 18
    x = torch.tensor([0.5, 1.0, 1.5])
    theta = guide.sample_posterior(x, num_samples=4000)["theta"]
    assert abs(theta.mean().item() - 0.75) < 0.1 and abs(theta.std().item() - 0.5) < 0.05
    assert math.isfinite(loss.validation_loss(simple_model, guide, torch.zeros(3)))


def test_stored_bank_items_come_back_in_the_order_asked(tmp_path):
    from pyro_jc.simulation import StoredBank

    bank_in_memory = simulate(
        simple_model, torch.zeros(3), num_simulations=300, batch_size=100, path=tmp_path
    )
    stored = StoredBank(tmp_path, cache_chunks=1)
    index = [250, 3, 120, 99, 100, 299]
    latents, observations = stored[index]
    assert torch.equal(observations["x"], bank_in_memory["observations"]["x"][index])
    assert torch.equal(latents["theta"], bank_in_memory["latents"]["theta"][index])


def test_banks_follow_the_data_device(device, tmp_path):
    """Simulations are drawn where the model's data live; a bank on disk is kept on the CPU
    and moved to the data's device for training."""
    from pyro.infer import SVI

    from pyro_jc import AutoAmortizedNormal, ForwardKL

    x = torch.zeros(3, device=device)
    bank = simulate(simple_model, x, num_simulations=200, batch_size=100)
    assert bank["observations"]["x"].device.type == device.type
    stored = simulate(simple_model, x, num_simulations=200, batch_size=100, path=tmp_path)
    assert stored["observations"]["x"].device.type == "cpu"
    loss = ForwardKL(num_particles=50, simulations=BankStore.open(tmp_path))
    guide = AutoAmortizedNormal(simple_model)
    svi = SVI(simple_model, guide, pyro.optim.Adam({"lr": 1e-2}), loss)
    assert math.isfinite(svi.step(x))
    assert all(p.device.type == device.type for p in guide.parameters())


def test_a_bank_streamed_from_disk_trains_to_the_posterior_of_the_bank_in_memory(tmp_path):
    """The same bank, once in memory and once streamed from its store a few chunks at a
    time: both guides reach the exact posterior of a linear-Gaussian model (the amortized
    Gaussian's mean and sd are read off exactly, so the tolerance is the training error of
    a bank of 6,000), and they agree with each other as closely."""
    from pyro.infer import SVI

    from pyro_jc import AutoAmortizedNormal, ForwardKL
    from pyro_jc import optim as jc_optim
    from pyro_jc.testing import LinearGaussianModel

    problem = LinearGaussianModel.random(2, 3, sigma=0.5, num_data=1, seed=3, dtype=torch.float32)
    pyro.set_rng_seed(0)
    bank = simulate(
        problem.model, problem.data, num_simulations=6000, batch_size=300, path=tmp_path
    )
    x_test = problem.sample_data(seed=1, num_data=100)
    mean, cov = problem.posterior_moments(x_test)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    fits = []
    for simulations in (bank, BankStore.open(tmp_path)):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        loss = ForwardKL(
            num_particles=200, simulations=simulations, generator=torch.Generator().manual_seed(0)
        )
        guide = AutoAmortizedNormal(problem.model)
        svi = SVI(problem.model, guide, jc_optim.Adam({"lr": 1e-2}), loss)
        loss.fit(svi, problem.data, max_epochs=60)
        x = x_test.unsqueeze(-2)
        low, high = guide.quantiles([0.15865525, 0.84134475], x)["z"].squeeze(-2)
        fits.append((guide.median(x)["z"].squeeze(-2), (high - low) / 2))
    for fit_mean, fit_sd in fits:
        assert ((fit_mean - mean).abs() / sd).mean() < 0.1
        assert ((fit_sd / sd) - 1).abs().mean() < 0.05
    (m0, s0), (m1, s1) = fits
    assert ((m0 - m1).abs() / sd).mean() < 0.1 and ((s0 / s1) - 1).abs().mean() < 0.05


def test_shards_are_disjoint_and_equal(tmp_path):
    """bank.shard(rank, world_size): disjoint shares of equal size (every rank runs as many
    steps); a stored bank shares whole chunks, so each rank reads only its own files."""
    from pyro_jc.simulation import SimulationBank, StoredBank

    bank = SimulationBank(simulate(simple_model, torch.zeros(3), num_simulations=101))
    shards = [bank.shard(r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [33, 33, 33]
    thetas = torch.cat([s.latents["theta"] for s in shards]).flatten().tolist()
    assert len(set(thetas)) == 99 and set(thetas) <= set(bank.latents["theta"].flatten().tolist())

    # Chunks of unequal size (draws dropped as invalid): shares cut to the smallest.
    def dropping(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[-1]):
            sim = Implicit(
                lambda t: np.where(t > 1.5, np.nan, t), theta, numpy=True, on_invalid="drop"
            )
            pyro.sample("x", sim, obs=x)

    with pytest.warns(UserWarning, match="dropped"):
        simulate(dropping, torch.zeros(3), num_simulations=1000, batch_size=100, path=tmp_path)
    stored = StoredBank(tmp_path, cache_chunks=1)
    shares = [stored.shard(r, 2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) <= len(stored) // 2
    assert set(shares[0].chunks).isdisjoint(shares[1].chunks)
    for share in shares:
        reads = share.reads
        latents, _ = share[torch.arange(len(share))]
        assert share.reads - reads == len(share.chunk_ranges()) <= len(share.chunks)
        assert len(latents["theta"]) == len(share)
    with pytest.raises(ValueError, match="before sharding"):
        shares[0].split(0.1)
    with pytest.raises(ValueError, match="rank < world_size"):
        bank.shard(3, 3)
    with pytest.raises(TypeError, match="rank must be an int"):
        bank.shard(0.0, 2)


def test_forward_kl_trains_on_its_shard(tmp_path):
    """ForwardKL(shard=(rank, world_size)) trains on that share of the training split and
    validates on the whole validation split; without a bank it is refused."""
    import torch.distributed as tdist

    from pyro_jc import ForwardKL

    bank = simulate(simple_model, torch.zeros(3), num_simulations=1000)
    whole = ForwardKL(
        num_particles=50, simulations=bank, generator=torch.Generator().manual_seed(0)
    )
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:  # a group of one: the split check runs (and agrees)
        half = ForwardKL(
            num_particles=50,
            simulations=bank,
            shard=(1, 2),
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        tdist.destroy_process_group()
    assert len(half.bank) == len(whole.bank) // 2 and half.steps_per_epoch == 9
    assert torch.equal(
        half.validation_bank.latents["theta"], whole.validation_bank.latents["theta"]
    )
    assert torch.equal(half.bank.latents["theta"], whole.bank.latents["theta"][1::2])
    with pytest.raises(ValueError, match="shard= shares a bank"):
        ForwardKL(shard=(0, 2))
