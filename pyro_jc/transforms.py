"""Conditional rational-quadratic spline layers: the neural spline flow (Durkan et al., 2019)
in coupling and autoregressive form, :class:`SoftIntervalTransform`, a bijection onto an
interval that leaves its interior as it is, and the pieces of a flow that ends on a box
(:class:`ConditionalBoxSplineAutoregressive`, :class:`UnitBoxToInterval`,
:class:`OnCoordinates`).

Pyro's conditional spline transforms use linear-order rational splines; these layers use
rational-quadratic ones. The coupling layer is one pass in both directions, so density
evaluation (:class:`~pyro_jc.ForwardKL`) and sampling (reparameterized ELBOs, posterior draws)
are both cheap; the autoregressive layer is one pass in its density direction.

**Reference:** Durkan, Bekasov, Murray and Papamakarios, *Neural Spline Flows*, NeurIPS 2019.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import Transform
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.nn import functional as F

from .nn import MLP

_MIN_BIN = 1e-3
# Raw parameters are soft-clipped to |.| < _LOG_RANGE (bin size ratios and slopes within
# 1e-3..1e3): extreme splines fit noise and make inversion ill-conditioned. A zero conditioner
# output gives equal bins and unit slopes, i.e. the identity map.
_LOG_RANGE = -math.log(1e-3)


def _soft_clip(raw, limit):
    return raw / torch.add(1.0, raw.abs(), alpha=1.0 / limit)


def _knots(unnormalized, bound):
    """Bin sizes (softmax with a floor) and the cumulative knot positions on ``[-bound, bound]``;
    ``unnormalized`` must be soft-clipped."""
    num_bins = unnormalized.shape[-1]
    # Softmax by hand: torch's CPU softmax costs ten times exp and sum over rows this short,
    # and the inputs are soft-clipped (|.| < 3.5), so exp needs no max-shift.
    weights = unnormalized.exp()
    sizes = _MIN_BIN + (1.0 - _MIN_BIN * num_bins) * (weights / weights.sum(-1, keepdim=True))
    inner = torch.add(-bound, torch.cumsum(sizes[..., :-1], -1), alpha=2.0 * bound)
    # The ends are pinned exactly so rounding cannot leave a gap at the interval's edges.
    end = torch.full_like(inner[..., :1], bound)
    cum = torch.cat([-end, inner, end], -1)
    return cum[..., 1:] - cum[..., :-1], cum


def rational_quadratic_spline(inputs, widths, heights, derivatives, bound, inverse=False):
    """Monotone rational-quadratic spline on ``[-bound, bound]``, identity outside.

    :param torch.Tensor inputs: values, shape ``(..., m)``.
    :param torch.Tensor widths: unnormalized bin widths, ``(..., m, K)``.
    :param torch.Tensor heights: unnormalized bin heights, ``(..., m, K)``.
    :param torch.Tensor derivatives: unconstrained interior knot slopes, ``(..., m, K - 1)``
        (the end slopes are 1, matching the identity tails).
    :param float bound: half-width of the spline's interval.
    :param bool inverse: evaluate the inverse map.
    :returns: ``(outputs, log_abs_det)``, where ``log_abs_det`` is always
        ``log |d forward / d x|`` at the (input, output) pair, elementwise.

    Zero parameters give the identity:

    >>> import torch
    >>> x = torch.linspace(-2, 2, 5).unsqueeze(-1)
    >>> zeros = torch.zeros(5, 1, 4)
    >>> y, log_det = rational_quadratic_spline(x, zeros, zeros, zeros[..., :3], bound=3.0)
    >>> torch.allclose(y, x, atol=1e-6), torch.allclose(log_det, torch.zeros(5, 1), atol=1e-6)
    (True, True)
    """
    inside = (inputs > -bound) & (inputs < bound)
    x = inputs.clamp(-bound, bound)
    # Widths and heights share each step (one kernel each instead of two).
    sizes, cum = _knots(_soft_clip(torch.stack([widths, heights]), _LOG_RANGE / 2), bound)
    slopes = F.pad(_soft_clip(derivatives, _LOG_RANGE).exp(), (1, 1), value=1.0)

    knots = cum[1] if inverse else cum[0]
    index = torch.searchsorted(knots[..., 1:-1].contiguous(), x.unsqueeze(-1).contiguous())
    # Everything the bin's formula needs, gathered at once.
    table = torch.cat(
        [cum[..., :-1], sizes, slopes[..., :-1].unsqueeze(0), slopes[..., 1:].unsqueeze(0)]
    )
    x_k, y_k, w, h, d_k, d_k1 = (
        table.gather(-1, index.expand(table.shape[:-1] + (1,))).squeeze(-1).unbind(0)
    )
    s = h / w
    curvature = d_k1 + d_k - 2 * s

    if inverse:
        dy = x - y_k
        a = h * (s - d_k) + dy * curvature
        b = h * d_k - dy * curvature
        c = -s * dy
        root = (b.pow(2) - 4 * a * c).clamp(min=0).sqrt()
        xi = (2 * c) / (-b - root)
    else:
        xi = (x - x_k) / w
    # Shared by the map and its derivative (each op here is paid again in the backward pass:
    # at small batches the spline's cost is its op count).
    one_minus = 1 - xi
    xi_one_minus = xi * one_minus
    xi2 = xi * xi
    denominator = s + curvature * xi_one_minus
    if inverse:
        outputs = xi * w + x_k
    else:
        outputs = y_k + h * (s * xi2 + d_k * xi_one_minus) / denominator
    numerator = s * s * (d_k1 * xi2 + 2 * s * xi_one_minus + d_k * one_minus * one_minus)
    log_abs_det = numerator.log() - 2 * denominator.log()
    outputs = torch.where(inside, outputs, inputs)
    log_abs_det = torch.where(inside, log_abs_det, torch.zeros_like(log_abs_det))
    return outputs, log_abs_det


def _zero_output(last):
    """Zero a spline layer's output layer ``last``: zero knots make the spline the
    identity, whatever the hidden weights."""
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def _reset_as_identity(conditioner, last):
    """Draw fresh hidden weights for a spline layer's conditioner, and zero its output."""
    for layer in conditioner.modules():
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()
    _zero_output(last)


class ConditionalSplineCoupling(ConditionalTransformModule):
    """Conditional rational-quadratic spline coupling layer: the first ``input_dim // 2``
    inputs pass through unchanged and, with the context, parametrize an elementwise spline of
    the others (alternate layers with a permutation, e.g. a reversal). With
    ``input_dim == 1`` the spline is conditioned on the context alone.

    :param int input_dim: event size.
    :param int context_dim: context size.
    :param hidden_dims: hidden widths of the conditioner MLP.
    :param int count_bins: spline bins.
    :param float bound: the spline acts on ``[-bound, bound]``; identity outside.
    """

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, input_dim, context_dim, hidden_dims=(50, 50), count_bins=10, bound=3.0):
        super().__init__()
        self.input_dim = input_dim
        self.split_dim = input_dim // 2
        self.count_bins = count_bins
        self.bound = bound
        transformed = input_dim - self.split_dim
        self.conditioner = MLP(
            self.split_dim + context_dim, list(hidden_dims), transformed * (3 * count_bins - 1)
        )
        _zero_output(self.conditioner[-1])  # the layer starts as the identity

    def reset_parameters(self) -> None:
        """Draw fresh hidden weights and zero the output layer: the layer is the identity."""
        _reset_as_identity(self.conditioner, self.conditioner[-1])

    def condition(self, context):
        return _SplineTransform(self, context)

    def _spline(self, inputs, context, inverse):
        fixed, changed = inputs[..., : self.split_dim], inputs[..., self.split_dim :]
        batch_shape = torch.broadcast_shapes(inputs.shape[:-1], context.shape[:-1])
        features = torch.cat(
            [
                fixed.expand(batch_shape + fixed.shape[-1:]),
                context.expand(batch_shape + context.shape[-1:]),
            ],
            -1,
        )
        K = self.count_bins
        params = self.conditioner(features).unflatten(-1, (changed.shape[-1], 3 * K - 1))
        widths, heights, derivatives = params[..., :K], params[..., K : 2 * K], params[..., 2 * K :]
        changed, log_abs_det = rational_quadratic_spline(
            changed.expand(batch_shape + changed.shape[-1:]),
            widths,
            heights,
            derivatives,
            self.bound,
            inverse,
        )
        outputs = torch.cat([fixed.expand(batch_shape + fixed.shape[-1:]), changed], -1)
        return outputs, log_abs_det.sum(-1)


class ConditionalSplineAutoregressive(ConditionalTransformModule):
    """Conditional rational-quadratic spline autoregressive layer: output ``i`` is a spline
    of input ``i`` whose knots come from a masked network (MADE) of inputs ``< i`` and the
    context. Forward is one pass; the inverse takes ``input_dim`` passes (use ``.inv`` to make
    density evaluation the one-pass direction, as a masked autoregressive flow does).

    :param int input_dim: event size.
    :param int context_dim: context size.
    :param hidden_dims: hidden widths of the masked conditioner.
    :param int count_bins: spline bins.
    :param float bound: the spline acts on ``[-bound, bound]``; identity outside.
    """

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, input_dim, context_dim, hidden_dims=(50, 50), count_bins=10, bound=3.0):
        if input_dim < 2:
            raise ValueError(
                "ConditionalSplineAutoregressive needs input_dim >= 2; for one dimension use "
                "ConditionalSplineCoupling (a spline conditioned on the context alone)."
            )
        super().__init__()
        self.input_dim = input_dim
        self.count_bins = count_bins
        self.bound = bound
        self.conditioner = ConditionalAutoRegressiveNN(
            input_dim,
            context_dim,
            list(hidden_dims),
            param_dims=[count_bins, count_bins, count_bins - 1],
            permutation=torch.arange(input_dim),
        )
        _zero_output(self.conditioner.layers[-1])  # the layer starts as the identity

    def reset_parameters(self) -> None:
        """Draw fresh hidden weights and zero the output layer: the layer is the identity."""
        _reset_as_identity(self.conditioner, self.conditioner.layers[-1])

    def condition(self, context):
        return _SplineTransform(self, context)

    def _spline(self, inputs, context, inverse):
        if not inverse:
            return self._elementwise(inputs, inputs, context, inverse=False)
        # Output i depends on inputs < i: pass i fixes coordinate i, and only its spline is
        # evaluated (the others' would be discarded), a d-th of the spline work.
        columns, log_abs_det = [], 0
        rest = torch.zeros_like(inputs)
        for i in range(self.input_dim):
            x = torch.cat([*columns, rest[..., i:]], -1) if columns else rest
            column, log_det = self._elementwise(inputs[..., i : i + 1], x, context, True, i)
            columns.append(column)
            log_abs_det = log_abs_det + log_det
        return torch.cat(columns, -1), log_abs_det

    def _elementwise(self, values, conditioning, context, inverse, column=None):
        """The splines at ``values`` (of coordinate ``column`` alone, when given), their
        knots from the conditioner at ``conditioning``; returns the outputs and the summed
        log-determinant."""
        if conditioning.shape[:-1] != context.shape[:-1]:  # torch.broadcast_shapes is slow
            batch_shape = torch.broadcast_shapes(conditioning.shape[:-1], context.shape[:-1])
            conditioning = conditioning.expand(batch_shape + conditioning.shape[-1:])
            values = values.expand(batch_shape + values.shape[-1:])
        if column is None:
            params = [p.transpose(-1, -2) for p in self.conditioner(conditioning, context)]
        else:
            params = self._column_knots(conditioning, context, column)
        outputs, log_abs_det = rational_quadratic_spline(values, *params, self.bound, inverse)
        return outputs, log_abs_det.sum(-1)

    def _column_knots(self, conditioning, context, column):
        """The conditioner's knots for coordinate ``column`` alone, each ``(..., 1, bins)``:
        its hidden layers as it computes them, of its output layer only that coordinate's
        rows (a tenth of the layer's work in ten dimensions, the largest of its layers)."""
        net = self.conditioner  # built without skip connections: its layers are the network
        h = torch.cat(
            [context.expand(conditioning.shape[:-1] + context.shape[-1:]), conditioning], -1
        )
        for layer in net.layers[:-1]:
            h = net.f(layer(h))
        last = net.layers[-1]
        # Output m * input_dim + j is the network's parameter m of coordinate j.
        rows = slice(column, None, self.input_dim)
        out = F.linear(h, last.weight[rows] * last.mask[rows], last.bias[rows])
        bins = self.count_bins
        return [p.unsqueeze(-2) for p in out.split([bins, bins, bins - 1], -1)]


class ConditionalBoxSplineAutoregressive(ConditionalSplineAutoregressive):
    """Conditional autoregressive rational-quadratic spline of the open box ``(-1, 1)^d``
    onto itself: the last layer of a flow whose coordinates were clamped into the box (see
    ``interval_transform="box"`` of :class:`~pyro_jc.AutoAmortizedFlow`).

    A flow pushed through a clamp turns a posterior cut by a bound into a tail, and whatever
    the flow puts past the bound is folded onto it; this layer, acting on the box itself, can
    reshape each coordinate's conditional right up to the faces. Its masked network sees
    ``atanh`` of the coordinates it conditions on, which spreads the last percent before
    each face over a unit-sized range (where the fold lands).

    :param int input_dim: number of box coordinates (at least 2; for one, use
        :class:`ConditionalSplineCoupling` with ``bound=1``).
    :param int context_dim: context size.
    :param hidden_dims: hidden widths of the masked conditioner.
    :param int count_bins: spline bins.
    """

    def __init__(self, input_dim, context_dim, hidden_dims=(50, 50), count_bins=10):
        super().__init__(input_dim, context_dim, hidden_dims, count_bins, bound=1.0)

    def _elementwise(self, values, conditioning, context, inverse, column=None):
        edge = 1 - torch.finfo(conditioning.dtype).eps
        features = torch.atanh(conditioning.clamp(-edge, edge)) / 3
        return super()._elementwise(values, features, context, inverse, column)


class _OntoInterval(Transform):
    """A bijection onto ``(low, high)`` whose values never round onto a bound."""

    bijective = True

    def __init__(self, low, high, cache_size=0):
        super().__init__(cache_size=cache_size)
        self.low, self.high = low, high

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return constraints.interval(self.low, self.high)

    def _bounds(self, like):
        low = torch.as_tensor(self.low, dtype=like.dtype, device=like.device)
        high = torch.as_tensor(self.high, dtype=like.dtype, device=like.device)
        return low, high

    def _strictly_inside(self, theta):
        # Rounding can land a value next to a bound on it (where e.g. Uniform's density is 0).
        low, high = self._bounds(theta)
        return torch.minimum(
            torch.maximum(theta, torch.nextafter(low, high)), torch.nextafter(high, low)
        )


class UnitBoxToInterval(_OntoInterval):
    """The affine map from ``(-1, 1)`` onto ``(low, high)``, kept strictly inside the
    interval (rounding could otherwise land a value near a face on the bound itself).

    :param low: lower bound (tensor or float).
    :param high: upper bound.
    """

    domain = constraints.interval(-1.0, 1.0)

    def with_cache(self, cache_size=1):
        if self._cache_size == cache_size:
            return self
        return UnitBoxToInterval(self.low, self.high, cache_size=cache_size)

    def __eq__(self, other):
        return (
            isinstance(other, UnitBoxToInterval)
            and _same(self.low, other.low)
            and _same(self.high, other.high)
        )

    def _call(self, b):
        low, high = self._bounds(b)
        return self._strictly_inside((high + low) / 2 + (high - low) / 2 * b)

    def _inverse(self, theta):
        low, high = self._bounds(theta)
        return (theta - (high + low) / 2) / ((high - low) / 2)

    def log_abs_det_jacobian(self, b, theta):
        low, high = self._bounds(b)
        return torch.log((high - low) / 2).expand_as(b)


class OnCoordinates(Transform):
    """Apply a transform of vectors (event dim 1) to some coordinates of a vector and leave
    the others as they are.

    :param Transform transform: acts on ``x[..., index]``.
    :param torch.Tensor index: the coordinates (a long tensor).
    """

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, transform, index):
        super().__init__(cache_size=1)
        self.transform, self.index = transform, index
        self._last = None

    def _apply(self, value, forward):
        part = value.index_select(-1, self.index)
        t = self.transform if forward else self.transform.inv
        out = t(part)
        log_abs_det = t.log_abs_det_jacobian(part, out)
        result = value.index_copy(-1, self.index, out)
        # Remembered as (x, y, log |dy/dx|) whichever way it was evaluated.
        self._last = (value, result, log_abs_det) if forward else (result, value, -log_abs_det)
        return result

    def _call(self, x):
        return self._apply(x, forward=True)

    def _inverse(self, y):
        return self._apply(y, forward=False)

    def log_abs_det_jacobian(self, x, y):
        last = self._last
        if last is None or not (x is last[0] or y is last[1]):
            self._apply(x, forward=True)
            last = self._last
        return last[2]


class _SplineTransform(Transform):
    """The layer bound to one context. Remembers the log-determinant of its last evaluation,
    so the density of a sample (or of a value just inverted) costs no second pass."""

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, layer, context):
        super().__init__(cache_size=1)
        self.layer = layer
        self.context = context
        self._last = None

    def _call(self, x):
        y, log_abs_det = self.layer._spline(x, self.context, inverse=False)
        self._last = (x, y, log_abs_det)
        return y

    def _inverse(self, y):
        x, log_abs_det = self.layer._spline(y, self.context, inverse=True)
        self._last = (x, y, log_abs_det)
        return x

    def log_abs_det_jacobian(self, x, y):
        last = self._last
        if last is not None and (x is last[0] or y is last[1]):
            return last[2]
        return self.layer._spline(x, self.context, inverse=False)[1]


class SoftIntervalTransform(_OntoInterval):
    """Bijection from the real line onto the interval ``(low, high)`` that is the identity
    (up to a shift) inside it: a smooth clamp. With centre ``c``, half-width ``r``,
    ``v = u / r`` and ``S(y) = \\delta\\,\\mathrm{softplus}(y / \\delta)``,

    .. math:: \\theta = c + r\\,\\bigl(S(v + 1) - S(v - 1) - 1\\bigr).

    Pyro's ``biject_to`` uses a sigmoid, which bends the whole interior (a point at 70% of the
    half-width is stretched twice as much as the centre), so a flow over the unconstrained
    value must first undo that curvature to fit a posterior inside the interval. This map has
    slope above 0.95 up to ``1 - 3 delta`` of the half-width; within about ``delta`` of a
    bound the distance to the bound falls exponentially in ``u``, as with the sigmoid, so a
    posterior piled against a bound becomes an exponential tail. Samples never leave the
    interval.

    :param low: lower bound (tensor or float).
    :param high: upper bound.
    :param float softness: ``delta``, the width of the bend near each bound as a fraction of
        the half-width.

    >>> import torch
    >>> t = SoftIntervalTransform(torch.tensor(0.0), torch.tensor(1.0))
    >>> u = torch.tensor([-100.0, 0.0, 0.1, 100.0])
    >>> theta = t(u)
    >>> bool(((theta > 0) & (theta < 1)).all()), round(float(theta[2] - theta[1]), 4)
    (True, 0.1)
    """

    domain = constraints.real

    def __init__(self, low, high, softness=0.05, cache_size=0):
        super().__init__(low, high, cache_size=cache_size)
        self.softness = softness

    def with_cache(self, cache_size=1):
        if self._cache_size == cache_size:
            return self
        return SoftIntervalTransform(self.low, self.high, self.softness, cache_size=cache_size)

    def __eq__(self, other):
        return (
            isinstance(other, SoftIntervalTransform)
            and self.softness == other.softness
            and _same(self.low, other.low)
            and _same(self.high, other.high)
        )

    def _centre_radius(self):
        return (self.high + self.low) / 2, (self.high - self.low) / 2

    def _call(self, u):
        c, r = self._centre_radius()
        v, d = u / r, self.softness

        def smooth_relu(y):
            # threshold: softplus's linear cut-off may not cost more than e^-40 in slope
            return d * F.softplus(y / d, threshold=40.0)

        # Two forms of the same odd function, each free of cancellation on its side.
        t = torch.where(
            v > 0,
            1 - smooth_relu(1 - v) + smooth_relu(-1 - v),
            smooth_relu(v + 1) - smooth_relu(v - 1) - 1,
        )
        eps = torch.finfo(t.dtype).eps
        return self._strictly_inside(c + r * t.clamp(-1 + eps, 1 - eps))

    def _inverse(self, theta):
        c, r = self._centre_radius()
        d = self.softness
        eps = torch.finfo(theta.dtype).eps
        t = ((theta - c) / r).clamp(-1 + eps, 1 - eps)
        # Solving 1 - |t| = S(1 - a) - S(-1 - a) for a = |v| in closed form, L = (1 - |t|) / d:
        # a = 1 + d log(1 - exp(L - 2 / d)) - d log(expm1(L)).
        L = (1 - t.abs()) / d
        log_expm1 = L + torch.log(-torch.expm1(-L))
        a = 1 + d * torch.log1p(-torch.exp(L - 2 / d)) - d * log_expm1
        # sign(t) a has a zero gradient at t = 0, where the slope is 1 (to within e^(-1/d)).
        return r * torch.where(t == 0, t, torch.sign(t) * a)

    def log_abs_det_jacobian(self, u, theta):
        _, r = self._centre_radius()
        a, d = (u / r).abs(), self.softness
        # log(sigmoid((1 - a) / d) - sigmoid(-(1 + a) / d)), an even function of v; the
        # log-ratio of the two sigmoids is written so that it stays exact for large a.
        log_ratio = -2 / d + F.softplus((1 - a) / d) - F.softplus(-(1 + a) / d)
        return F.logsigmoid((1 - a) / d) + torch.log1p(-torch.exp(log_ratio))


def _same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.shape == b.shape
            and bool((a == b).all())
        )
    return a == b
