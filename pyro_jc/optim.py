"""One torch optimizer for all of a guide's parameters, usable wherever SVI takes a PyroOptim.

Pyro's :class:`~pyro.optim.PyroOptim` creates one torch optimizer per parameter tensor and
steps them one by one. That allows per-parameter settings, but a flow guide has dozens of
small tensors, and on a CPU the Python loop costs as much as the network itself (measured in
``examples/benchmark_forward_kl.py``). :class:`SingleOptimizer` keeps one torch optimizer,
as a hand-written PyTorch loop would, and is a drop-in ``optim=`` for
:class:`~pyro.infer.SVI`.
"""

from __future__ import annotations

import copy

import pyro
import torch
from pyro.optim import PyroOptim


class SingleOptimizer(PyroOptim):
    """A :class:`~pyro.optim.PyroOptim` that steps every parameter with one torch optimizer.

    Parameters seen for the first time join the optimizer as a new parameter group. As with
    ``PyroOptim``, only the parameters of the current step move: the others keep their
    values and optimizer state.

    :param optim_constructor: a :class:`torch.optim.Optimizer` class.
    :param dict optim_args: its keyword arguments (one set for all parameters; for
        per-parameter settings use Pyro's optimizers).
    :param dict clip_args: ``{"clip_norm": c}`` or ``{"clip_value": c}``, applied per
        parameter before the step, as Pyro does.
    """

    def __init__(self, optim_constructor, optim_args, clip_args=None):
        if not isinstance(optim_args, dict):
            raise ValueError(
                "SingleOptimizer takes one dict of optimizer arguments for all parameters; "
                "for per-parameter arguments (a callable) use pyro.optim's optimizers."
            )
        clip_args = dict(clip_args or {})
        unknown = set(clip_args) - {"clip_norm", "clip_value"}
        if unknown:
            raise ValueError(f"clip_args takes 'clip_norm' or 'clip_value', got {sorted(unknown)}.")
        super().__init__(optim_constructor, optim_args, clip_args)
        self.optimizer = None
        self._members = set()
        self._names = []

    def __call__(self, params, *args, **kwargs):
        params = list(params)
        new = [p for p in params if p not in self._members]
        if new:
            self._add(new)
        current = set(params)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p not in current:
                    p.grad = None  # torch optimizers skip parameters without a gradient
        self._clip(params)
        self.optimizer.step(*args, **kwargs)

    def _add(self, params):
        store = pyro.get_param_store()
        # SVI hands over a set: order by name so that a saved state maps back.
        params = sorted(params, key=lambda p: store.param_name(p) or "")
        if self.optimizer is None:
            self.optimizer = self.pt_optim_constructor(params, **self.pt_optim_args)
        else:
            self.optimizer.add_param_group({"params": params})
        self._members.update(params)
        self._names.append([store.param_name(p) for p in params])
        pending = self._state_waiting_to_be_consumed
        if pending.get("names") == self._names:
            self.optimizer.load_state_dict(pending["optimizer"])
            pending.clear()

    def _clip(self, params):
        if "clip_norm" in self.pt_clip_args:
            for p in params:
                torch.nn.utils.clip_grad_norm_(p, self.pt_clip_args["clip_norm"])
        if "clip_value" in self.pt_clip_args:
            torch.nn.utils.clip_grad_value_(params, self.pt_clip_args["clip_value"])

    def get_state(self):
        """The optimizer's state dict and the names of its parameter groups."""
        if self.optimizer is None:
            return {}
        # A copy: torch's state dict shares the tensors that later steps update in place.
        state = copy.deepcopy(self.optimizer.state_dict())
        return {"names": [list(g) for g in self._names], "optimizer": state}

    def set_state(self, state_dict):
        """Restore a :meth:`get_state`: applied once the same parameters, in the same groups,
        have joined (e.g. after the first step of a new run)."""
        self._state_waiting_to_be_consumed = dict(state_dict)
        if self.optimizer is not None and state_dict.get("names") == self._names:
            self.optimizer.load_state_dict(state_dict["optimizer"])
            self._state_waiting_to_be_consumed = {}


def Adam(optim_args, clip_args=None):
    """:class:`SingleOptimizer` around :class:`torch.optim.Adam`; a drop-in for
    ``pyro.optim.Adam`` when all parameters share one set of arguments.

    Unless ``optim_args`` says otherwise, the update runs as one multi-tensor (``foreach``)
    kernel on every device: torch uses it by default only on GPUs, but for a guide's many
    small tensors it was 30% faster on a CPU too (``examples/benchmark_forward_kl.py``).
    """
    optim_args = dict(optim_args) if isinstance(optim_args, dict) else optim_args
    if isinstance(optim_args, dict):
        optim_args.setdefault("foreach", True)
    return SingleOptimizer(torch.optim.Adam, optim_args, clip_args)
