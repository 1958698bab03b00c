"""Pieces of the training loop that work with any SVI loss: learning-rate control through
torch's schedulers."""

from __future__ import annotations

import warnings

from pyro.optim import PyroLRScheduler
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LearningRateFactor"]


class LearningRateFactor:
    """Scales the learning rate of every torch optimizer behind a Pyro optimizer (one per
    parameter for :mod:`pyro.optim`, one in all for :func:`pyro_jc.optim.Adam`) by a
    factor, through :class:`torch.optim.lr_scheduler.LambdaLR`.

    The factor multiplies each parameter group's *initial* rate, which torch's schedulers
    record in the group (``initial_lr``) the first time: per-parameter (callable) optimizer
    arguments keep their ratios, and a new ``LearningRateFactor`` on the same optimizer
    (a second :meth:`~pyro_jc.ForwardKL.fit`) starts again from the configured rates
    instead of where the previous one left them. Optimizers that Pyro creates later (new
    parameters) are scheduled from the next :meth:`set` on; until then they take the
    optimizer's own arguments.

    A :class:`~pyro.optim.PyroLRScheduler` owns its rates: :attr:`controls` is ``False`` and
    :meth:`set` does nothing.

    :param pyro.optim.PyroOptim optim: the optimizer of an :class:`~pyro.infer.SVI`.
    """

    def __init__(self, optim):
        self.optim = optim
        self.factor = 1.0
        self._schedulers = {}

    @property
    def controls(self):
        """Whether the rates can be scaled: an optimizer exists and no scheduler owns them."""
        return not isinstance(self.optim, PyroLRScheduler) and bool(self._optimizers())

    def _optimizers(self):
        optimizer = getattr(self.optim, "optimizer", None)  # pyro_jc.optim.SingleOptimizer
        if optimizer is not None:
            return [optimizer]
        return list(getattr(self.optim, "optim_objs", {}).values())

    def set(self, factor):
        """Set every rate to ``factor`` times its initial value.

        :returns: whether any rate is controlled (see :attr:`controls`).
        """
        if isinstance(self.optim, PyroLRScheduler):
            return False
        self.factor = float(factor)
        optimizers = self._optimizers()
        with warnings.catch_warnings():
            # The schedulers step at our pace, not after each optimizer step.
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
            for optimizer in optimizers:
                scheduler = self._schedulers.get(id(optimizer))
                if scheduler is None or len(scheduler.base_lrs) != len(optimizer.param_groups):
                    # New (or with new parameter groups): the constructor applies the factor.
                    self._schedulers[id(optimizer)] = LambdaLR(optimizer, self._factor)
                else:
                    scheduler.step()
        return bool(optimizers)

    def _factor(self, _epoch):
        return self.factor
