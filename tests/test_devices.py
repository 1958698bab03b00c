"""Device placement: host data (numpy simulator outputs, banks read from disk) move to the
model's device through pinned, non-blocking copies; fresh simulations, banks and the
guide's standardization live where the model's data live."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

from pyro_jc import AutoAmortizedNormal, ForwardKL, Implicit, simulate
from pyro_jc import optim as jc_optim
from pyro_jc.devices import to_device


@pytest.mark.parametrize("source", ["numpy", "tensor"])
def test_to_device_places_and_casts(source, device):
    value = np.arange(6.0).reshape(2, 3)
    if source == "tensor":
        value = torch.as_tensor(value)
    moved = to_device(value, device, torch.float32)
    assert moved.device.type == device.type and moved.dtype == torch.float32
    assert torch.equal(moved.cpu(), torch.arange(6.0).reshape(2, 3))
    assert to_device(value, device).dtype == torch.float64  # numpy's float64 kept


def test_to_device_copies_to_cuda_through_pinned_memory(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pinned = []
    real = torch.Tensor.pin_memory

    def spy(self, *args, **kwargs):
        pinned.append(self.shape)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    out = to_device(np.ones((4, 2)), torch.device("cuda"), torch.float32)
    torch.cuda.synchronize()
    assert pinned == [torch.Size([4, 2])] and out.is_cuda and float(out.sum()) == 8.0


def numpy_model(x):
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", x.shape[-1]):
        sim = Implicit(lambda t: t + np.random.randn(*t.shape), theta, numpy=True)
        pyro.sample("x", sim, obs=x)


def test_fresh_numpy_simulations_train_a_guide_on_the_data_device(device):
    """The numpy simulator runs on the host; its outputs, the guide's parameters and its
    standardization are on the data's device, and the guide learns the exact posterior
    (theta | x ~ N(sum x / 4, 1 / 4) for three points)."""
    x = torch.tensor([0.5, 1.0, 1.5], device=device)
    bank = simulate(numpy_model, x, num_simulations=50)
    assert bank["observations"]["x"].device.type == device.type
    guide = AutoAmortizedNormal(numpy_model)
    # The rate decays (to 0.13 of its start) so that the last iterate is not dominated by
    # the step noise: at a constant 1e-2 the posterior sd missed the bound in 1 of 7 seeds.
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.995})
    svi = SVI(numpy_model, guide, optim, ForwardKL(num_particles=256))
    for _ in range(400):
        svi.step(x)
    assert all(p.device.type == device.type for p in guide.parameters())
    assert all(b.device.type == device.type for b in guide.buffers())
    theta = guide.sample_posterior(x, num_samples=4000)["theta"]
    assert theta.device.type == device.type
    assert abs(theta.mean().item() - 0.75) < 0.08 and abs(theta.std().item() - 0.5) < 0.05


def test_a_shard_of_a_stored_bank_trains_on_the_data_device(device, tmp_path):
    from pyro_jc.store import BankStore

    x = torch.zeros(3, device=device)
    simulate(numpy_model, x, num_simulations=400, batch_size=50, path=tmp_path)
    loss = ForwardKL(num_particles=50, simulations=BankStore.open(tmp_path), shard=(0, 2))
    guide = AutoAmortizedNormal(numpy_model)
    svi = SVI(numpy_model, guide, jc_optim.Adam({"lr": 1e-2}), loss)
    for _ in range(loss.steps_per_epoch):
        svi.step(x)
    assert all(p.device.type == device.type for p in guide.parameters())
