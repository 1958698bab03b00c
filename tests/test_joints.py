"""Pairs from the model joint and the data plate lookup."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_jc.joints import find_data_plate, model_joint_trace, num_datapoints
from pyro_jc.testing import LinearGaussianModel


def test_model_joint_draws_from_the_evidence(device):
    """x ~ p(x) = N(b, A A^T + sigma^2 I): simulated observations replace the data."""
    lg = LinearGaussianModel.random(2, 3, device=device)
    x = lg.sample_data(0, 4)
    trace = model_joint_trace(lg.model, (x,), {}, num_samples=5000, max_plate_nesting=1)
    site = trace.nodes["x"]
    assert site["value"].shape == (5000, 4, 3)
    assert torch.equal(site["infer"]["obs"], x)  # the real observation is kept
    sims = site["value"].reshape(-1, 3)
    se = lg.evidence_cov().diagonal().sqrt() / sims.shape[0] ** 0.5
    assert ((sims.mean(0) - lg.b).abs() < 4 * se * 2).all()  # 2: the 4 columns share z draws
    assert torch.allclose(sims.T.cov(), lg.evidence_cov(), atol=0.1)


def test_model_joint_needs_plate_nesting():
    lg = LinearGaussianModel.random(1, 1)
    with pytest.raises(ValueError, match="max_plate_nesting"):
        model_joint_trace(lg.model, (lg.sample_data(0, 2),), {}, num_samples=3)


def test_data_plate_is_outermost_shared_by_observations():
    def model():
        with pyro.plate("data", 10, subsample_size=4, dim=-2):
            with pyro.plate("pixels", 3, dim=-1):
                pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.zeros(4, 3))
        pyro.sample("y", dist.Normal(0.0, 1.0))

    trace = pyro.poutine.trace(model).get_trace()
    frame = find_data_plate(trace)
    assert frame.name == "data" and num_datapoints(frame) == 10
    assert find_data_plate(trace, "pixels").name == "pixels"
    assert num_datapoints(None) == 1
