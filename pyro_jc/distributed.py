"""Data-parallel training across processes with :mod:`torch.distributed`.

:class:`DistributedOptim` wraps any optimizer that :class:`~pyro.infer.SVI` takes (Pyro's,
or :func:`pyro_jc.optim.Adam`): before each step it averages the gradients over the ranks
with one ``all_reduce``, so every rank takes the same step, as
:class:`~torch.nn.parallel.DistributedDataParallel` does for a module. Pyro guides are not
called as ``module(input)`` under a DDP wrapper (SVI runs them inside its handlers), so the
reduction happens where SVI hands the parameters to the optimizer.

Recipe (``torchrun --nproc_per_node=K script.py``; ``gloo`` on CPUs, ``nccl`` on GPUs)::

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    pyro.set_rng_seed(0)                 # the same on every rank: the same initial guide
    svi = SVI(model, guide, DistributedOptim(optim.Adam({"lr": 1e-3})), ForwardKL(256 // K))
    svi.step(x_obs)                      # sets the guide and its standardization up
    pyro.set_rng_seed(1 + rank)          # then each rank simulates its own pairs
    for _ in range(num_steps):
        svi.step(x_obs)

Each rank then draws ``num_particles`` fresh simulations per step: ``K`` ranks train as one
process with ``K`` times the particles, in the time of one.
"""

from __future__ import annotations

from typing import Any

import pyro
import torch
import torch.distributed as dist
from pyro.optim import PyroOptim

__all__ = ["DistributedOptim"]


class DistributedOptim(PyroOptim):
    """An optimizer for :class:`~pyro.infer.SVI` that averages gradients over the ranks of
    a :mod:`torch.distributed` process group before delegating the step.

    Parameters met for the first time are first broadcast from rank 0, so that the ranks
    hold the same guide even if their initializations differed (seed them alike anyway:
    the set-up step's gradients are computed at each rank's own values, and a guide's
    standardization is fitted from that step's simulations). Every rank must step the same
    parameters (the same model and guide), which SVI does.

    :param optim: the optimizer to wrap (a :class:`~pyro.optim.PyroOptim` or
        :class:`~pyro_jc.optim.SingleOptimizer`).
    :param group: the process group (default: the world).
    """

    def __init__(self, optim: Any, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedOptim needs torch.distributed initialized: call "
                "torch.distributed.init_process_group(...) first (torchrun sets the "
                "environment), or train without it in a single process."
            )
        # A PyroOptim for SVI's type check; its own state is the wrapped optimizer's.
        self.optim = optim
        self.group = group
        self._seen = set()

    def __call__(self, params, *args, **kwargs):
        # SVI hands over a set, in an order of its own on each rank: order by name.
        store = pyro.get_param_store()
        params = sorted(params, key=lambda p: store.param_name(p) or "")
        new = [p for p in params if p not in self._seen]
        if new:
            with torch.no_grad():
                for p in new:
                    dist.broadcast(p.data, src=0, group=self.group)
            self._seen.update(new)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            flat /= dist.get_world_size(self.group)
            offset = 0
            for p, g in zip(params, grads, strict=True):
                p.grad = flat[offset : offset + g.numel()].view_as(g)
                offset += g.numel()
        return self.optim(params, *args, **kwargs)

    def get_state(self):
        return self.optim.get_state()

    def set_state(self, state):
        return self.optim.set_state(state)

    def __getattr__(self, name):
        # Everything else (optim_objs, optimizer, pt_optim_args) is the wrapped optimizer's.
        if name == "optim":
            raise AttributeError(name)
        return getattr(self.optim, name)
