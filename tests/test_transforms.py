"""The conditional rational-quadratic spline coupling layer: bijection, exact log-determinant,
identity at initialisation, broadcasting of samples against contexts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_jc.transforms import (
    ConditionalSplineAutoregressive,
    ConditionalSplineCoupling,
    rational_quadratic_spline,
)


def random_layer(d, context_dim=3, seed=0, autoregressive=False):
    torch.manual_seed(seed)
    if autoregressive:
        layer = ConditionalSplineAutoregressive(d, context_dim, (16,), count_bins=6, bound=3.0)
    else:
        layer = ConditionalSplineCoupling(d, context_dim, (16,), count_bins=6, bound=3.0)
    for p in layer.parameters():  # away from the identity initialisation
        torch.nn.init.normal_(p, std=0.4)
    return layer.double()


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 5),
    autoregressive=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_inverse_and_log_det_are_exact(d, autoregressive, seed):
    autoregressive = autoregressive and d > 1
    layer = random_layer(d, seed=seed, autoregressive=autoregressive)
    context = torch.randn(6, 3, dtype=torch.float64)
    x = 2.5 * torch.randn(6, d, dtype=torch.float64)  # some inputs fall in the identity tails
    y = layer.condition(context)(x)
    x_back = layer.condition(context).inv(y)  # a fresh transform: no cached pair
    assert torch.allclose(x_back, x, atol=1e-7)  # steep random splines amplify rounding
    jac = torch.stack(
        [torch.autograd.functional.jacobian(layer.condition(context[i]), x[i]) for i in range(6)]
    )
    expected = torch.linalg.slogdet(jac)[1]
    t = layer.condition(context)
    assert torch.allclose(t.log_abs_det_jacobian(x, t(x)), expected, atol=1e-9)
    t = layer.condition(context)  # the value the inverse pass remembers is the forward one
    assert torch.allclose(t.log_abs_det_jacobian(t.inv(y), y), expected, atol=1e-9)


@pytest.mark.parametrize(
    "layer_class", [ConditionalSplineCoupling, ConditionalSplineAutoregressive]
)
def test_starts_as_identity(layer_class):
    layer = layer_class(4, 2)
    x, context = torch.randn(10, 4), torch.randn(10, 2)
    t = layer.condition(context)
    assert torch.allclose(t(x), x, atol=1e-5)
    assert torch.allclose(t.log_abs_det_jacobian(x, t(x)), torch.zeros(10), atol=1e-5)


@pytest.mark.parametrize("autoregressive", [False, True])
def test_samples_broadcast_against_contexts(autoregressive):
    layer = random_layer(3, autoregressive=autoregressive)
    context = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    y = layer.condition(context)(x)
    assert y.shape == (7, 4, 3)
    assert torch.allclose(y[2, 1], layer.condition(context[1])(x[2, 1]))
    assert torch.allclose(layer.condition(context).inv(y.clone()), x, atol=1e-9)


def test_autoregressive_output_depends_only_on_earlier_inputs():
    layer = random_layer(4, autoregressive=True)
    x, context = torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(layer.condition(context), x)
    assert torch.equal(jac.triu(1), torch.zeros_like(jac))
    assert (jac.diagonal() > 0).all()


def test_coupling_keeps_the_first_half():
    x, context = torch.randn(5, 5), torch.randn(5, 3)
    y = random_layer(5).float().condition(context)(x)
    assert torch.equal(y[:, :2], x[:, :2])
    assert not torch.allclose(y[:, 2:], x[:, 2:])


def test_spline_is_monotone_and_maps_the_interval_onto_itself():
    torch.manual_seed(1)
    x = torch.linspace(-3, 3, 2001).unsqueeze(-1)
    widths, heights = torch.randn(1, 8).expand(2001, 1, 8), torch.randn(1, 8).expand(2001, 1, 8)
    derivatives = torch.randn(1, 7).expand(2001, 1, 7)
    y, _ = rational_quadratic_spline(x, widths, heights, derivatives, bound=3.0)
    assert (y.diff(dim=0) > 0).all()
    assert y[0].item() == pytest.approx(-3.0, abs=1e-5) and y[-1].item() == pytest.approx(
        3.0, abs=1e-5
    )


def test_autoregressive_layer_needs_two_dimensions():
    with pytest.raises(ValueError, match="input_dim >= 2; for one dimension use"):
        ConditionalSplineAutoregressive(1, 3)
