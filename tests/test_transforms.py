"""The conditional rational-quadratic spline layers (bijection, exact log-determinant,
identity at initialisation, broadcasting of samples against contexts) and the soft interval
bijection."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_jc.transforms import (
    ConditionalBoxSplineAutoregressive,
    ConditionalSplineAutoregressive,
    ConditionalSplineCoupling,
    OnCoordinates,
    SoftIntervalTransform,
    UnitBoxToInterval,
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


@pytest.mark.parametrize("box", [False, True])
@pytest.mark.parametrize("d", [2, 5])
def test_autoregressive_inverse_has_the_inverse_jacobian(box, d):
    """The inverse fixes one coordinate per pass from that coordinate's spline alone; the
    gradient of a reparameterized draw flows through it, so its Jacobian must be the inverse
    of the forward Jacobian at the point it returns (and the context's gradient that of the
    implicit function: d x / d c = -J_x^-1 d y / d c)."""
    torch.manual_seed(d)
    if box:
        layer = ConditionalBoxSplineAutoregressive(d, 3, (16,), count_bins=6)
    else:
        layer = ConditionalSplineAutoregressive(d, 3, (16,), count_bins=6, bound=3.0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.4)
    layer = layer.double()
    context = torch.randn(3, dtype=torch.float64)
    y = torch.rand(d, dtype=torch.float64) * 1.8 - 0.9
    x = layer.condition(context).inv(y)
    jac_x = torch.autograd.functional.jacobian(lambda v: layer.condition(context)(v), x)
    jac_inv = torch.autograd.functional.jacobian(lambda v: layer.condition(context).inv(v), y)
    assert torch.allclose(jac_inv, torch.linalg.inv(jac_x), atol=1e-8)
    jac_c = torch.autograd.functional.jacobian(lambda c: layer.condition(c)(x), context)
    jac_inv_c = torch.autograd.functional.jacobian(lambda c: layer.condition(c).inv(y), context)
    assert torch.allclose(jac_inv_c, -torch.linalg.solve(jac_x, jac_c), atol=1e-8)


def test_autoregressive_layer_needs_two_dimensions():
    with pytest.raises(ValueError, match="input_dim >= 2; for one dimension use"):
        ConditionalSplineAutoregressive(1, 3)


# -- the box layer and its helpers ----------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_box_spline_maps_the_box_onto_itself_with_exact_log_det(d, seed):
    torch.manual_seed(seed)
    layer = ConditionalBoxSplineAutoregressive(d, 3, (16,), count_bins=6)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.4)
    layer = layer.double()
    context = torch.randn(6, 3, dtype=torch.float64)
    # Points all over the box, some within 1e-6 of a face (where the fold of a clamp lands).
    x = torch.rand(6, d, dtype=torch.float64) * 2 - 1
    x[0] = 1 - 1e-6
    x[1, 0] = -1 + 1e-6
    y = layer.condition(context)(x)
    assert ((y > -1) & (y < 1)).all()
    assert torch.allclose(layer.condition(context).inv(y), x, atol=1e-7)
    jac = torch.stack(
        [torch.autograd.functional.jacobian(layer.condition(context[i]), x[i]) for i in range(6)]
    )
    t = layer.condition(context)
    assert torch.allclose(t.log_abs_det_jacobian(x, t(x)), torch.linalg.slogdet(jac)[1])
    assert torch.equal(jac.triu(1), torch.zeros_like(jac))  # autoregressive


def test_box_spline_conditioner_resolves_the_faces():
    """Points 1e-3 and 1e-6 from a face get different conditionals (the atanh features):
    the second coordinate's map differs between them."""
    torch.manual_seed(0)
    layer = ConditionalBoxSplineAutoregressive(2, 1, (16,), count_bins=6)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.4)
    x = torch.tensor([[1 - 1e-3, 0.3], [1 - 1e-6, 0.3]])
    y = layer.condition(torch.zeros(2, 1))(x)
    assert (y[0, 1] - y[1, 1]).abs() > 1e-3


def test_unit_box_to_interval_stays_inside_and_inverts():
    low, high = torch.tensor([0.0, -2.0]), torch.tensor([1.0, 3.0])
    t = UnitBoxToInterval(low, high)
    b = torch.tensor([[-1 + 1e-9, 1 - 1e-9], [0.0, 0.5]])
    theta = t(b)
    assert ((theta > low) & (theta < high)).all()  # rounding onto a bound is prevented
    assert torch.allclose(theta[1], torch.tensor([0.5, 1.75]))
    assert torch.allclose(t.inv(theta[1]), b[1])
    assert torch.allclose(t.log_abs_det_jacobian(b, theta), ((high - low) / 2).log().expand(2, 2))
    assert t == UnitBoxToInterval(low.clone(), high.clone()) and t != UnitBoxToInterval(
        low, 2 * high
    )


def test_on_coordinates_transforms_only_its_coordinates():
    inner = torch.distributions.transforms.IndependentTransform(SoftIntervalTransform(-1.0, 1.0), 1)
    t = OnCoordinates(inner, torch.tensor([0, 2]))
    x = torch.tensor([[0.97, 7.0, -0.5], [0.2, -9.0, 1.04]], dtype=torch.float64)
    y = t(x)
    assert torch.equal(y[:, 1], x[:, 1])
    assert torch.allclose(y[:, [0, 2]], inner(x[:, [0, 2]]))
    jac = torch.stack([torch.autograd.functional.jacobian(t, x[i]) for i in range(2)])
    assert torch.allclose(t.log_abs_det_jacobian(x, y), torch.linalg.slogdet(jac)[1])
    fresh = OnCoordinates(inner, torch.tensor([0, 2]))
    x_back = fresh.inv(y)
    assert torch.allclose(x_back, x)
    assert torch.allclose(fresh.log_abs_det_jacobian(x_back, y), torch.linalg.slogdet(jac)[1])


# -- SoftIntervalTransform -----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    low=st.floats(-5, 5),
    width=st.floats(0.01, 10),
    softness=st.sampled_from([0.02, 0.05, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_soft_interval_is_a_bijection_with_exact_log_det(low, width, softness, seed):
    low = torch.tensor(low, dtype=torch.float64)
    t = SoftIntervalTransform(low, low + width, softness)
    g = torch.Generator().manual_seed(seed)
    # Up to 1.25 half-widths out: farther, theta sits within float precision of a bound.
    u = width / 2 * (2.5 * torch.rand(50, generator=g, dtype=torch.float64) - 1.25)
    theta = t(u)
    assert ((theta > low) & (theta < low + width)).all()
    assert torch.allclose(t.inv(theta), u, atol=1e-6 * width)
    grad = torch.func.vmap(torch.func.grad(lambda v: t(v)))(u)
    assert torch.allclose(t.log_abs_det_jacobian(u, theta), grad.log(), atol=1e-9)


def test_soft_interval_is_the_identity_in_the_interior():
    t = SoftIntervalTransform(torch.tensor(-1.0), torch.tensor(1.0))
    theta = torch.linspace(-0.75, 0.75, 31)
    u = t.inv(theta)
    assert torch.allclose(u, theta, atol=1e-3)
    assert (t.log_abs_det_jacobian(u, theta).exp() > 0.985).all()


def test_soft_interval_extremes_stay_inside_with_finite_gradients(device):
    low = torch.tensor([0.0, -2.0], device=device)
    high = torch.tensor([1.0, 3.0], device=device)
    t = SoftIntervalTransform(low, high)
    u = torch.tensor([[-1e30, 1e30], [0.0, 0.0], [1e-30, -1e-30]], device=device)
    u.requires_grad_()
    theta = t(u)
    assert ((theta > low) & (theta < high)).all()
    (theta.sum() + t.log_abs_det_jacobian(u, theta).sum()).backward()
    assert torch.isfinite(u.grad).all()
    edges = torch.stack([low, high, (low + high) / 2]).requires_grad_()
    back = t.inv(edges)  # values on the bounds themselves (float rounding) map to finite u
    back.sum().backward()
    assert torch.isfinite(back).all() and torch.isfinite(edges.grad).all()
    assert torch.allclose(edges.grad[2], torch.ones(2, device=device))  # slope at the centre


def test_soft_interval_caches_and_compares_like_torch_transforms():
    low, high = torch.tensor([0.0, -1.0]), torch.tensor([1.0, 2.0])
    t = SoftIntervalTransform(low, high)
    cached = t.with_cache(1)
    assert cached is not t and cached.with_cache(1) is cached and cached == t
    u = torch.randn(3, 2)
    theta = cached(u)
    assert cached.inv(theta) is u  # the cache returns the input itself
    assert t != SoftIntervalTransform(low, high, softness=0.1)
    assert t != SoftIntervalTransform(low, high + 1)
    # Composed as Pyro does for a box prior (IndependentTransform caches through its base).
    composed = torch.distributions.transforms.IndependentTransform(t, 1).with_cache(1)
    assert torch.equal(composed(u), theta)


def _conditioned(layer_class, d, **kwargs):
    def make(seed):
        torch.manual_seed(seed)
        layer = layer_class(d, 3, (16,), count_bins=6, **kwargs)
        for p in layer.parameters():  # away from the identity initialisation
            torch.nn.init.normal_(p, std=0.4)
        layer = layer.double()
        return layer.condition(torch.randn(6, 3, dtype=torch.float64))

    return make


def _box_inputs(n, d, generator):
    return 0.98 * (2 * torch.rand(n, d, generator=generator, dtype=torch.float64) - 1)


def _unbounded_inputs(n, d, generator):
    return 2.5 * torch.randn(n, d, generator=generator, dtype=torch.float64)


def _around(low, high):
    """Inputs of the soft interval map (centred on the interval's midpoint) up to 1.25
    half-widths out: farther, the value sits within float precision of a bound."""

    def sample(n, d, generator):
        u = torch.rand(n, d, generator=generator, dtype=torch.float64)
        return (high - low) / 2 * (2.5 * u - 1.25)

    return sample


#: Every transform pyro_jc offers, with a sampler of inputs in its domain and the event dim
#: its log-determinant sums over.
CONTRACT = {
    "spline_coupling": (_conditioned(ConditionalSplineCoupling, 3, bound=3.0), _unbounded_inputs),
    "spline_autoregressive": (
        _conditioned(ConditionalSplineAutoregressive, 3, bound=3.0),
        _unbounded_inputs,
    ),
    "box_spline": (_conditioned(ConditionalBoxSplineAutoregressive, 3), _box_inputs),
    "soft_interval": (
        lambda seed: torch.distributions.transforms.IndependentTransform(
            SoftIntervalTransform(-1.0, 2.0), 1
        ),
        _around(-1.0, 2.0),
    ),
    "unit_box_to_interval": (
        lambda seed: torch.distributions.transforms.IndependentTransform(
            UnitBoxToInterval(-1.0, 2.0), 1
        ),
        _box_inputs,
    ),
    "on_coordinates": (
        lambda seed: OnCoordinates(
            torch.distributions.transforms.IndependentTransform(SoftIntervalTransform(0.0, 1.0), 1),
            torch.tensor([0, 2]),
        ),
        _around(0.0, 1.0),
    ),
}


@pytest.mark.parametrize("name", sorted(CONTRACT))
@pytest.mark.parametrize("seed", [0, 1])
def test_every_transform_keeps_the_bijection_contract(name, seed):
    """One contract for every transform: the inverse undoes the forward map (with a fresh,
    uncached transform), the values land in the codomain, and the log-determinant is the
    autograd Jacobian's, evaluated from either side."""
    make, inputs = CONTRACT[name]
    x = inputs(6, 3, torch.Generator().manual_seed(seed))
    t = make(seed)
    y = t(x)
    assert bool(t.codomain.check(y).all())
    assert torch.allclose(make(seed).inv(y), x, atol=1e-6)
    fresh = make(seed)
    jac = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda v, i=i: fresh(v.expand(6, 3))[i], x[i])
            for i in range(6)
        ]
    )
    expected = torch.linalg.slogdet(jac)[1]
    assert torch.allclose(t.log_abs_det_jacobian(x, y), expected, atol=1e-8)
    inverse = make(seed)
    assert torch.allclose(inverse.log_abs_det_jacobian(inverse.inv(y), y), expected, atol=1e-8)
