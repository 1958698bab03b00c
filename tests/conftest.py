import pyro
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_addoption(parser):
    parser.addoption("--device", action="append", default=None, help="restrict device fixture")


@pytest.fixture(params=DEVICES)
def device(request):
    chosen = request.config.getoption("--device")
    if chosen and request.param not in chosen:
        pytest.skip(f"device {request.param} not selected")
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
