import pyro
import pytest
import torch
from hypothesis import settings

# Seeded like every other random test: the same examples on every run, so that a statistical
# check (an SBC at level 0.01, say) cannot pass on one run and fail on the next.
settings.register_profile("pyro_jc", derandomize=True)
settings.load_profile("pyro_jc")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_addoption(parser):
    parser.addoption("--device", action="append", default=None, help="restrict device fixture")
    parser.addoption(
        "--device-tests-only",
        action="store_true",
        help="run only the tests that take the device fixture (make gpu-check)",
    )
    parser.addoption(
        "--rng-seed",
        type=int,
        default=0,
        help="the seed each test starts from (default 0); a statistical test that fails "
        "under another seed passed by luck",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--device-tests-only"):
        return
    chosen = config.getoption("--device")
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on = callspec.params.get("device") if callspec else None
        (keep if on is not None and (not chosen or on in chosen) else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.fixture(params=DEVICES)
def device(request):
    chosen = request.config.getoption("--device")
    if chosen and request.param not in chosen:
        pytest.skip(f"device {request.param} not selected")
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # torch's default of one thread per core makes the suite over ten times slower on a
    # busy 2-core machine (CI's size); the tests and benchmarks measure one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_pyro(request):
    pyro.clear_param_store()
    pyro.set_rng_seed(request.config.getoption("--rng-seed"))
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
