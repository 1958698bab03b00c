"""Fuzzing bad input (hypothesis): random model layouts, random corruptions of the data.

Whatever the layout and the corruption, a loss step or a simulation ends in one of two ways:
a pyro_jc error (a :class:`~pyro_jc.JointContrastiveError`, which names the site or argument
and the remedy), or, for data that are valid, a finite result. Never a torch-internal
traceback, and never a finite number computed from broken data.
"""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI

from pyro_jc import (
    AdversarialELBO,
    AutoAmortizedFlow,
    AutoAmortizedNormal,
    ForwardKL,
    JointContrastiveELBO,
    JointContrastiveError,
    JointContrastiveIWELBO,
    JointContrastiveMeanFieldELBO,
    UnsupportedModelError,
    simulate,
)

#: Corruptions after which the data are still valid (a finite result is the right answer).
VALID = {"none", "float64", "integer"}
#: Corruptions that must be refused with a pyro_jc error.
INVALID = {"nan", "inf", "numpy", "list", "extra_leading_dim", "extra_trailing_dim", "drop_dim"}


@st.composite
def layouts(draw):
    """A model: latents local to a data plate or global, real or positive, of dim 1-3;
    an observed site per datapoint with event dim 0 or 1."""
    return {
        "local": draw(st.booleans()),
        "latent_dim": draw(st.integers(1, 3)),
        "positive": draw(st.booleans()),
        "obs_dim": draw(st.sampled_from([None, 1, 3])),  # None: scalar observations
        "num_data": draw(st.integers(1, 5)),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(layout):
    d, m, n = layout["latent_dim"], layout["obs_dim"], layout["num_data"]
    g = torch.Generator().manual_seed(layout["seed"])
    weights = torch.randn(d, m or 1, generator=g)
    event = () if m is None else (m,)

    def model(x):
        prior = dist.LogNormal(0.0, 0.5) if layout["positive"] else dist.Normal(0.0, 1.0)
        data_plate = pyro.plate("data", n)
        if layout["local"]:
            with data_plate:
                z = pyro.sample("z", prior.expand([d]).to_event(1))
        else:
            z = pyro.sample("z", prior.expand([d]).to_event(1))
        loc = z @ weights  # (..., n or 1, m or 1), or (m or 1,) for a global z
        with data_plate:
            if m is None:
                likelihood = dist.Normal(loc.squeeze(-1), 0.5)
            else:
                likelihood = dist.Normal(loc, 0.5).to_event(1)
            pyro.sample("x", likelihood, obs=x)

    data = torch.randn((n,) + event, generator=g)
    return model, data


def corrupt(data, corruption, seed):
    g = torch.Generator().manual_seed(seed)
    index = tuple(int(torch.randint(s, (), generator=g)) for s in data.shape)
    if corruption in ("nan", "inf"):
        data = data.clone()
        data[index] = math.nan if corruption == "nan" else -math.inf
        return data
    return {
        "none": lambda: data,
        "float64": lambda: data.double(),
        "integer": lambda: data.round().long(),
        "numpy": lambda: data.numpy(),
        "list": lambda: data.tolist(),
        "extra_leading_dim": lambda: data.unsqueeze(0).expand((2,) + data.shape),
        "extra_trailing_dim": lambda: data.unsqueeze(-1).expand(data.shape + (2,)),
        "drop_dim": lambda: data[..., 0] if data.dim() > 1 else data[:1].reshape(()),
    }[corruption]()


def still_valid(corruption, data, shape):
    """A dropped dim of size 1 leaves data that equal the original up to leading dims of
    size 1, which Pyro and pyro_jc accept: such a corruption is no corruption."""
    if corruption == "drop_dim":
        padded = (1,) * (len(shape) - data.dim()) + tuple(data.shape)
        if padded == tuple(shape):
            return "none"
    return corruption


GUIDES = {"normal": AutoAmortizedNormal, "flow": AutoAmortizedFlow}
LOSSES = {
    "adversarial": lambda: AdversarialELBO(warmup_steps=1, hidden_dims=(8,)),
    "elbo": lambda: JointContrastiveELBO(num_particles=2),
    "mean_field": lambda: JointContrastiveMeanFieldELBO(),
    "iwelbo": lambda: JointContrastiveIWELBO(num_particles=3),
    "forward_kl": lambda: ForwardKL(num_particles=8),
}


UNSUPPORTED = "unsupported"


def outcome(run):
    """``None`` for a pyro_jc error, :data:`UNSUPPORTED` for a model the loss or guide
    does not cover (the adversarial loss and global latents), else the value; anything
    else fails the test."""
    try:
        with warnings.catch_warnings():
            # Warnings of odd layouts (a single datapoint, say) are not this test's subject.
            warnings.simplefilter("ignore")
            return run()
    except UnsupportedModelError:
        return UNSUPPORTED
    except JointContrastiveError:
        return None


@settings(max_examples=300, deadline=None)
@given(
    layout=layouts(),
    corruption=st.sampled_from(sorted(VALID | INVALID)),
    guide=st.sampled_from(sorted(GUIDES)),
    loss=st.sampled_from(sorted(LOSSES)),
)
def test_a_step_on_corrupted_data_is_a_clear_error_or_finite(layout, corruption, guide, loss):
    pyro.clear_param_store()
    pyro.set_rng_seed(layout["seed"])
    model, data = build(layout)
    shape = data.shape
    data = corrupt(data, corruption, layout["seed"])
    corruption = still_valid(corruption, data, shape)
    svi = SVI(model, GUIDES[guide](model), pyro.optim.Adam({"lr": 1e-3}), LOSSES[loss]())
    value = outcome(lambda: svi.step(data))
    if value == UNSUPPORTED:
        assert loss == "adversarial" and not layout["local"]
    elif corruption in VALID:
        assert value is not None and math.isfinite(value), (layout, corruption)
    else:
        assert value is None, f"{corruption} data gave {value} instead of an error"


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), corruption=st.sampled_from(sorted(VALID | INVALID)))
def test_simulating_from_corrupted_data_is_a_clear_error_or_a_bank(layout, corruption):
    """The data fix the plate sizes of the simulations. NaN or inf in them is refused
    too (one model inspection serves simulation and training alike, and such data would
    fail the training that the bank is for)."""
    pyro.set_rng_seed(layout["seed"])
    model, data = build(layout)
    shape = data.shape
    data = corrupt(data, corruption, layout["seed"])
    corruption = still_valid(corruption, data, shape)
    bank = outcome(lambda: simulate(model, data, num_simulations=7))
    if corruption in VALID:
        assert bank is not None
        x = bank["observations"]["x"]
        assert x.shape[0] == 7 and bool(torch.isfinite(x).all())
    else:
        assert bank is None, f"{corruption} data gave a bank instead of an error"


@pytest.mark.parametrize("bad", [np.zeros(3), [0.0, 1.0, 2.0]], ids=["numpy", "list"])
def test_fuzz_corruptions_are_refused_by_name(bad):
    """The fuzz test's notion of refused: the error names the site and the fix."""
    model, _ = build(
        {"local": True, "latent_dim": 1, "positive": False, "obs_dim": None, "num_data": 3}
        | {"seed": 0}
    )
    with pytest.raises(JointContrastiveError, match="'x'.*torch.as_tensor"):
        simulate(model, bad, num_simulations=2)
