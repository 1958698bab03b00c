"""Implicit distributions: sample-only Pyro distributions around a simulator.

A simulator is any function from parameters to a sample: torch or numpy, vectorized over a
batch or one draw at a time, differentiable or a black box. Wrapped in :class:`Implicit`, it
is an ordinary site of a Pyro model (plates, vectorized particles, ``Predictive``), but has
no density: losses that need ``log_prob`` refuse it with a clear error, and the
likelihood-free losses (:class:`~pyro_jc.ForwardKL`, the adversarial guide) use it.
"""

from __future__ import annotations

import math
import numbers
import traceback
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.util import broadcast_shape
from pyro.poutine.messenger import Messenger

from .devices import to_device
from .errors import ImplicitDensityError, SimulatorError, SimulatorWarning

#: Key of ``site["infer"]`` holding the boolean mask of simulations dropped as invalid.
INVALID_KEY = "invalid_simulations"

_ON_INVALID = ("raise", "drop")

#: simulator -> {(site, exception type)} whose dropped draws were reported already.
_WARNED = weakref.WeakKeyDictionary()


class Implicit(TorchDistribution):
    r"""A distribution known only through a simulator: ``x ~ simulator(*params)``.

    The batch shape is the broadcast of the parameters' batch shapes (each parameter's shape
    minus its ``param_event_dims`` rightmost dims). A vectorized simulator receives every
    draw at once: each parameter broadcast and flattened to shape
    ``(n, *param_event_shape)``, and it must return shape ``(n, *event_shape)``. Under
    plates and vectorized particles ``n`` is the product of all batch and sample dims.
    With ``vectorized=False`` the simulator is called once per draw with parameters of
    shape ``param_event_shape`` and must return shape ``event_shape``.

    Example (a numpy simulator, one draw at a time)::

        def sir(beta, gamma):
            ...                      # numpy arrays in, numpy array of shape (10,) out
            return counts

        with pyro.plate("data", n):
            pyro.sample("x", Implicit(sir, beta, gamma, event_shape=(10,),
                                      vectorized=False, numpy=True), obs=x)

    A vectorized torch simulator under a plate:

    >>> import torch
    >>> from pyro_jc import Implicit
    >>> noisy = Implicit(lambda loc: loc + 0.1 * torch.randn(loc.shape), torch.zeros(3))
    >>> noisy.batch_shape, noisy.sample().shape
    (torch.Size([3]), torch.Size([3]))

    :param callable simulator: the simulator.
    :param params: its parameters (tensors or numbers); they set device and dtype of the
        output.
    :param event_shape: shape of one simulated outcome.
    :param param_event_dims: number of rightmost dims of each parameter that belong to one
        simulation (an int for all, or one per parameter); ``0`` for scalar parameters.
    :param bool vectorized: whether the simulator handles a batch of draws.
    :param bool numpy: pass parameters as numpy arrays (detached, on the CPU); one draw at
        a time, a scalar parameter comes as a numpy scalar (``np.float32``, say). Whatever
        the simulator returns (tensor, array, list) comes back as a tensor on the
        parameters' device and dtype.
    :param bool reparameterized: the simulator is a differentiable torch function of its
        parameters (and its own noise); :meth:`rsample` then carries gradients.
    :param support: the outcome's support (default real).
    :param str on_invalid: ``"raise"`` (default) raises :class:`~pyro_jc.SimulatorError` on
        non-finite output or when the simulator raises (naming the draw and its
        parameters); ``"drop"`` marks such draws invalid (zeros in their place) and records
        their mask so that :class:`~pyro_jc.ForwardKL` and :func:`~pyro_jc.simulate` drop them
        (they count and report how many; the first exception's traceback is shown in a
        :class:`~pyro_jc.errors.SimulatorWarning`). A vectorized simulator that raises is
        retried one draw at a time to find the draws that raise; a call in which every draw
        raises is an error either way.
    """

    arg_constraints = {}

    def __init__(
        self,
        simulator: Callable,
        *params: Any,
        event_shape: Sequence[int] = (),
        param_event_dims: int | Sequence[int] = 0,
        vectorized: bool = True,
        numpy: bool = False,
        reparameterized: bool = False,
        support: constraints.Constraint = constraints.real,
        on_invalid: str = "raise",
        validate_args: bool | None = None,
    ) -> None:
        if not callable(simulator):
            raise TypeError(f"Implicit needs a callable simulator, got {type(simulator)}.")
        if on_invalid not in _ON_INVALID:
            raise ValueError(f"on_invalid must be one of {_ON_INVALID}, got {on_invalid!r}.")
        if isinstance(param_event_dims, numbers.Integral):
            param_event_dims = (int(param_event_dims),) * len(params)
        param_event_dims = tuple(param_event_dims)
        if len(param_event_dims) != len(params):
            raise ValueError(
                f"param_event_dims has {len(param_event_dims)} entries for {len(params)} "
                "parameters; give one per parameter or a single int."
            )
        tensors = _as_tensors(params)
        for i, (p, d) in enumerate(zip(tensors, param_event_dims, strict=True)):
            if p.dim() < d:
                raise ValueError(
                    f"Parameter {i} of the simulator has shape {tuple(p.shape)}, fewer dims "
                    f"than its param_event_dims={d}."
                )
        self.simulator = simulator
        self.params = tensors
        self.param_event_dims = param_event_dims
        self.vectorized = vectorized
        self.numpy = numpy
        self.reparameterized = reparameterized
        self.on_invalid = on_invalid
        self._support = support
        #: Mask of the draws of the latest sample that were invalid (``on_invalid="drop"``).
        self.last_invalid = None
        # Pyro's pure-Python broadcast: torch.broadcast_shapes imports torch._refs on first
        # use (a third of a second, paid again by every simulation worker process).
        batch_shape = torch.Size(
            broadcast_shape(
                *(p.shape[: p.dim() - d] for p, d in zip(tensors, param_event_dims, strict=True))
            )
        )
        super().__init__(batch_shape, torch.Size(event_shape), validate_args=validate_args)

    @property
    def has_rsample(self):
        return self.reparameterized

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.independent(self._support, len(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        params = [
            p.expand(batch_shape + p.shape[p.dim() - d :])
            for p, d in zip(self.params, self.param_event_dims, strict=True)
        ]
        new = Implicit(
            self.simulator,
            *params,
            event_shape=self.event_shape,
            param_event_dims=self.param_event_dims,
            vectorized=self.vectorized,
            numpy=self.numpy,
            reparameterized=self.reparameterized,
            support=self._support,
            on_invalid=self.on_invalid,
            validate_args=False,
        )
        new._site_name = getattr(self, "_site_name", None)
        return new

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self._simulate(sample_shape, detach=True)

    def rsample(self, sample_shape=()):
        if not self.reparameterized:
            raise NotImplementedError(
                f"{self._where()} is not reparameterized: its simulator is treated as a black "
                "box. Pass reparameterized=True if it is a differentiable torch function."
            )
        return self._simulate(sample_shape, detach=False)

    def log_prob(self, value):
        raise ImplicitDensityError(
            f"{self._where()} has no density: its likelihood is implicit (a simulator that can "
            "only be sampled), so log_prob cannot be evaluated. Train with a likelihood-free "
            "loss: pyro_jc.ForwardKL (simulation-based training of an amortized guide) or "
            "pyro_jc.AdversarialELBO (a discriminator estimates the density ratio)."
        )

    # -----------------------------------------------------------------------------------------

    def _where(self):
        name = getattr(self, "_site_name", None)
        return f"Implicit site {name!r}" if name else "An Implicit distribution"

    def _simulate(self, sample_shape, detach):
        shape = torch.Size(sample_shape) + self.batch_shape
        n = shape.numel()
        flat = []
        for p, d in zip(self.params, self.param_event_dims, strict=True):
            event = p.shape[p.dim() - d :]
            p = p.detach() if detach else p
            flat.append(p.expand(shape + event).reshape((n,) + event))
        ref = self.params[0] if self.params else torch.zeros(())
        if self.vectorized:
            try:
                out = self._call(flat)
            except Exception as e:
                if self.on_invalid != "drop" or n < 2:
                    raise self._raised(e, "its vectorized call", flat) from e
                # The batch cannot say which draw raised: retry them one by one (as batches
                # of one) so that only the draws that raise are dropped.
                out = self._one_by_one(flat, n, ref, batch=True)
            else:
                out = self._to_tensor(out, ref)
                self._check_shape(out, (n,) + self.event_shape, "returned")
        else:
            out = self._one_by_one(flat, n, ref, batch=False)
        out = self._check_finite(out)
        return out.reshape(shape + self.event_shape)

    def _one_by_one(self, flat, n, ref, batch):
        # The per-draw loop is the cost of a cheap simulator: convert the parameters once,
        # block the simulator's own sites once, and convert the outputs once at the end.
        if self.numpy:
            flat = [t.detach().cpu().numpy() for t in flat]
        outputs, failed = [], []
        with poutine.block():
            for i in range(n):
                # A scalar parameter of a numpy simulator comes as a numpy scalar (p[i]):
                # numpy's arithmetic on those is a third faster than on 0-d arrays.
                params = [p[i : i + 1] if batch else p[i] for p in flat]
                try:
                    outputs.append(self.simulator(*params))
                except Exception as e:
                    if self.on_invalid != "drop":
                        raise self._raised(e, f"draw {i} of {n}", params) from e
                    failed.append(e)
                    outputs.append(None)  # NaN in its place: dropped as invalid
        if failed:
            if len(failed) == n and n > 1:
                # Every draw raising is a broken simulator, not a bad region of the prior.
                raise self._raised(failed[0], f"every one of the {n} draws", None) from failed[0]
            self._warn_dropped(failed[0])
        if not outputs:
            return ref.new_zeros((0,) + self.event_shape)
        shape = ((1,) if batch else ()) + tuple(self.event_shape)
        return self._stacked(outputs, shape, ref, batch)

    def _stacked(self, outputs, shape, ref, batch):
        """The draws' outputs as one tensor ``(n, *event_shape)``: in one conversion when they
        are all numpy (or all tensors) of the right shape, else draw by draw, which names the
        first draw that is wrong."""
        kinds = {type(o) for o in outputs if o is not None}
        if kinds <= {np.ndarray} or kinds <= {torch.Tensor}:
            stack = np.stack if kinds <= {np.ndarray} else torch.stack
            first = next((o for o in outputs if o is not None), None)
            blank = (
                torch.full(shape, math.nan, dtype=first.dtype, device=first.device)
                if torch.is_tensor(first)
                else np.full(shape, np.nan)
            )
            try:
                if all(o is None or tuple(o.shape) == shape for o in outputs):
                    out = stack([blank if o is None else o for o in outputs])
                    out = self._to_tensor(out, ref)
                    return out[:, 0] if batch else out
            except (TypeError, ValueError, RuntimeError):
                pass  # mixed dtypes and the like: the careful path below says what is wrong
        draws = []
        for i, o in enumerate(outputs):
            if o is None:
                draws.append(ref.new_full(self.event_shape, math.nan))
                continue
            draw = self._to_tensor(o, ref)
            self._check_shape(draw, shape, f"returned for draw {i}")
            draws.append(draw[0] if batch else draw)
        return torch.stack(draws)

    def _warn_dropped(self, error):
        # Once per simulator, site and exception type: a run of many chunks must not repeat
        # it (simulate and ForwardKL report the counts).
        try:
            seen = _WARNED.setdefault(getattr(self.simulator, "__func__", self.simulator), set())
        except TypeError:  # not weakly referenceable: say it every time
            seen = set()
        key = (self._where(), type(error))
        if key in seen:
            return
        seen.add(key)
        first = "".join(traceback.format_exception(error)).rstrip()
        warnings.warn(
            f"{self._where()}: the simulator raised {type(error).__name__} for some draws; "
            "they are dropped as invalid (on_invalid='drop') and counted with the non-finite "
            f"ones. The first error:\n{first}",
            SimulatorWarning,
            stacklevel=5,
        )

    def _raised(self, error, where, params):
        shown = ""
        if params is not None:
            values = [p.tolist() if torch.is_tensor(p) and p.numel() <= 8 else p for p in params]
            shown = f" with parameters {values}"
        return SimulatorError(
            f"{self._where()}: the simulator raised {type(error).__name__}: {error} in "
            f"{where}{shown}. Fix the simulator, restrict the prior to parameters it handles, "
            "or pass on_invalid='drop' to discard the draws that raise (counted and reported)."
        )

    def _call(self, tensors):
        if self.numpy:
            tensors = [t.detach().cpu().numpy() for t in tensors]
        # A simulator written with pyro.sample statements (sbibm's are) is a black box here:
        # its internal sites must not enter the enclosing model's trace.
        with poutine.block():
            return self.simulator(*tensors)

    def _to_tensor(self, out, ref):
        if out.is_complex() if torch.is_tensor(out) else np.iscomplexobj(out):
            raise SimulatorError(
                f"{self._where()}: the simulator returned complex values; a real-valued site "
                "would drop their imaginary part. Return real values (e.g. torch.view_as_real "
                "or the modulus) and give the site the matching event_shape."
            )
        if isinstance(out, torch.Tensor):
            return to_device(out, ref.device, ref.dtype)
        try:
            # numpy outputs are made on the host: pinned, non-blocking copies to a GPU.
            return to_device(np.asarray(out), ref.device, ref.dtype)
        except (TypeError, ValueError) as e:
            raise SimulatorError(
                f"{self._where()}: the simulator returned {type(out).__name__}, which cannot be "
                "converted to a tensor; return a torch tensor or a numeric numpy array."
            ) from e

    def _check_shape(self, out, expected, what):
        if out.shape != torch.Size(expected):
            hint = (
                "A vectorized simulator receives parameters flattened to (n, *param_event_shape) "
                "and must return (n, *event_shape); pass vectorized=False for a simulator that "
                "draws one outcome per call."
                if self.vectorized
                else "Check event_shape and param_event_dims."
            )
            raise SimulatorError(
                f"{self._where()}: the simulator {what} shape {tuple(out.shape)}, expected "
                f"{tuple(expected)} (event_shape={tuple(self.event_shape)}). {hint}"
            )

    def _check_finite(self, out):
        valid = torch.isfinite(out).reshape(out.shape[0], -1).all(-1)
        self.last_invalid = None
        if bool(valid.all()):
            return out
        num_bad = int((~valid).sum())
        if self.on_invalid == "raise":
            raise SimulatorError(
                f"{self._where()}: the simulator returned non-finite values (NaN or inf) in "
                f"{num_bad} of {out.shape[0]} draws. Fix the simulator, restrict the prior to "
                "parameters it handles, or pass on_invalid='drop' to discard such draws (the "
                "losses count and report them)."
            )
        self.last_invalid = ~valid
        mask = (~valid).reshape((-1,) + (1,) * len(self.event_shape))
        return torch.where(mask, torch.zeros_like(out), out)


def _as_tensors(params):
    tensors = [p for p in params if isinstance(p, torch.Tensor)]
    ref = tensors[0] if tensors else None
    out = []
    for p in params:
        if isinstance(p, torch.Tensor):
            out.append(p)
        elif ref is not None:
            out.append(torch.as_tensor(p, dtype=ref.dtype, device=ref.device))
        else:
            out.append(torch.as_tensor(p, dtype=torch.get_default_dtype()))
    return out


def base_implicit(fn):
    """The :class:`Implicit` inside ``fn`` (through ``Independent``, ``expand``, masks), or
    ``None``."""
    while fn is not None:
        if isinstance(fn, Implicit):
            return fn
        fn = getattr(fn, "base_dist", None)
    return None


class SimulatorSites(Messenger):
    """Handler that names :class:`Implicit` sites in their errors and records the mask of
    dropped draws in ``site["infer"]["invalid_simulations"]`` (shape of the site's batch)."""

    def _pyro_sample(self, msg):
        implicit = base_implicit(msg["fn"])
        if implicit is not None:
            implicit._site_name = msg["name"]

    def _pyro_post_sample(self, msg):
        implicit = base_implicit(msg["fn"])
        if implicit is None or implicit.last_invalid is None or msg["is_observed"]:
            return
        event_dim = len(msg["fn"].event_shape)
        batch_shape = msg["value"].shape[: msg["value"].dim() - event_dim]
        invalid = implicit.last_invalid
        # The base draws may be fewer than the site's (expanded) batch: broadcast them.
        msg["infer"][INVALID_KEY] = _broadcast_invalid(invalid, batch_shape)
        implicit.last_invalid = None


def _broadcast_invalid(invalid, batch_shape):
    n = batch_shape.numel()
    if invalid.numel() == n:
        return invalid.reshape(batch_shape)
    # An ExpandedDistribution drew independent copies in the interstitial dims; without a
    # way to map them back, mark the whole batch by any invalid draw.
    return invalid.any().expand(batch_shape)
