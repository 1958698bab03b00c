"""Every error names the site and the remedy, and is raised before any optimizer step."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

from pyro_jc import (
    ImplicitDensityError,
    JointContrastiveELBO,
    JointContrastiveIWELBO,
    JointContrastiveMeanFieldELBO,
    MissingGuideSiteError,
    NonFiniteError,
    PlateShapeError,
)

LOSSES = [JointContrastiveELBO, JointContrastiveMeanFieldELBO, JointContrastiveIWELBO]


class SampleOnly(dist.TorchDistribution):
    """A simulator-like distribution with no density."""

    arg_constraints = {}

    def __init__(self, loc):
        self.loc = loc
        super().__init__(batch_shape=loc.shape)

    def sample(self, sample_shape=()):
        return self.loc + torch.randn(torch.Size(sample_shape) + self.loc.shape).exp()

    def log_prob(self, value):
        raise NotImplementedError


def normal_guide(x):
    loc = pyro.param("loc", torch.zeros(3))
    with pyro.plate("data", 3):
        pyro.sample("z", dist.Normal(loc, 1.0))


def step_params_unchanged(loss_cls, model, guide, x, error):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), loss=loss_cls())
    with pytest.raises(error) as info:
        svi.step(x)
    if "loc" in pyro.get_param_store():
        assert (pyro.param("loc") == 0).all()  # no optimizer step happened
    return str(info.value)


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_implicit_likelihood(loss_cls):
    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", SampleOnly(z), obs=x)

    msg = step_params_unchanged(loss_cls, model, normal_guide, torch.zeros(3), ImplicitDensityError)
    assert "'x'" in msg and "observed" in msg and "implicit" in msg
    assert "ForwardKL" in msg and "AdversarialELBO" in msg


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_implicit_guide(loss_cls):
    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 3):
            pyro.sample("z", SampleOnly(torch.zeros(3)))

    msg = step_params_unchanged(loss_cls, model, guide, torch.zeros(3), ImplicitDensityError)
    assert "Guide site 'z'" in msg and "AdversarialELBO" in msg


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_latent_missing_from_guide(loss_cls):
    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(w, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    msg = step_params_unchanged(
        loss_cls, model, normal_guide, torch.zeros(3), MissingGuideSiteError
    )
    assert "'w'" in msg and "pyro.sample('w', ...)" in msg


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_guide_returns_nan(loss_cls):
    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", 3):
            pyro.sample(
                "z",
                dist.Normal(loc + torch.tensor([0.0, float("nan"), 0.0]), 1.0, validate_args=False),
            )

    msg = step_params_unchanged(loss_cls, model, guide, torch.zeros(3), NonFiniteError)
    assert "Guide site 'z'" in msg and "non-finite values" in msg


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_guide_sample_outside_model_support(loss_cls):
    def model(x):
        with pyro.plate("data", 3):
            rate = pyro.sample("rate", dist.Exponential(1.0))
            pyro.sample("x", dist.Poisson(rate), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", 3):
            # A Normal guide for a positive latent: negative draws have log p = -inf.
            pyro.sample("rate", dist.Normal(loc - 5.0, 0.1))

    with pyro.validation_enabled(False):
        msg = step_params_unchanged(loss_cls, model, guide, torch.ones(3), NonFiniteError)
    assert "Guide site 'rate'" in msg and "support" in msg and "biject_to" in msg


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_batch_shape_disagrees_with_plate(loss_cls):
    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0).expand([2, 3]), obs=x)

    msg = step_params_unchanged(loss_cls, model, normal_guide, torch.zeros(2, 3), PlateShapeError)
    assert "site 'x'" in msg and "data(size=3, dim=-1)" in msg and "to_event" in msg


def test_tensor_smaller_than_plate():
    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z[:2], 1.0), obs=x[:2])

    msg = step_params_unchanged(
        JointContrastiveELBO, model, normal_guide, torch.zeros(3), PlateShapeError
    )
    assert "In the model" in msg and "site x" in msg and "plate" in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta must be non-negative"):
        JointContrastiveELBO(beta=-1.0)

    def model(x):
        with pyro.plate("data", 3):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    elbo = JointContrastiveELBO(data_plate="rows")
    with pytest.raises(ValueError, match="data_plate='rows'.*plates seen: \\['data'\\]"):
        elbo.loss(model, lambda x: None, torch.zeros(3))


def test_information_estimate_rejects_masks():
    def model(x):
        with pyro.plate("data", 3), pyro.poutine.mask(mask=torch.tensor([True, False, True])):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    elbo = JointContrastiveELBO(estimate_information=True)
    with pytest.raises(NotImplementedError, match="'z' is masked.*estimate_information=False"):
        elbo.loss(model, normal_guide, torch.zeros(3))
