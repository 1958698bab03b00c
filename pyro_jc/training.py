"""The training loop, for any SVI loss: budgets of steps or seconds, epochs with validation,
early stopping and learning-rate decay at plateaus, cosine annealing, interruption; learning
rates changed through torch's schedulers only; checkpoints that continue training."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import PyroLRScheduler, PyroOptim
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LearningRateFactor", "fit", "load_checkpoint", "save_checkpoint"]


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

    def __init__(self, optim: PyroOptim) -> None:
        self.optim = optim
        self.factor = 1.0
        self._schedulers = {}

    @property
    def controls(self) -> bool:
        """Whether the rates can be scaled: an optimizer exists and no scheduler owns them."""
        return not isinstance(self.optim, PyroLRScheduler) and bool(self._optimizers())

    def _optimizers(self):
        optimizer = getattr(self.optim, "optimizer", None)  # pyro_jc.optim.SingleOptimizer
        if optimizer is not None:
            return [optimizer]
        return list(getattr(self.optim, "optim_objs", {}).values())

    def set(self, factor: float) -> bool:
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


#: The annealed learning rate ends at this fraction of its initial value.
FINAL_RATE = 1e-3


def fit(
    svi: SVI,
    *args: Any,
    num_steps: int | None = None,
    seconds: float | None = None,
    max_epochs: int | None = None,
    steps_per_epoch: int | None = None,
    validation: Callable[[], float] | None = None,
    patience: int = 20,
    lr_decays: int = 2,
    lr_factor: float = 0.2,
    decay_patience: int = 5,
    average: float | None = None,
    anneal: bool = True,
    progress: bool | None = None,
    **kwargs: Any,
) -> dict:
    """Train with ``svi.step(*args, **kwargs)``, for any SVI loss, in one of two ways.

    **Epochs with validation** (when ``steps_per_epoch`` is given, or the loss has one: a
    :class:`~pyro_jc.ForwardKL` with a simulation bank): epochs of ``steps_per_epoch``
    steps, ``validation()`` evaluated after each (default: the loss's
    ``validation_loss(model, guide, *args, **kwargs)``). When ``patience`` epochs pass
    without improvement, the parameters of the best epoch are restored and, up to
    ``lr_decays`` times, training goes on from them with the learning rate multiplied by
    ``lr_factor`` (and ``decay_patience`` epochs of patience); then it stops. The guide left
    behind is the best one seen (param store and, for an ``nn.Module`` guide, its state).

    **A budget** (otherwise): steps until ``num_steps`` steps or ``seconds`` of wall clock
    (whichever ends first) are spent, the learning rate following a cosine from its initial
    value down to a thousandth of it over the budget [1] (``anneal=False``: constant). The
    clock is read between steps: a budget ends within one step of its time, and a warning says
    so when a step takes longer than the whole budget.

    The rates change only through torch's schedulers (:class:`LearningRateFactor`), as
    multiples of the rates the optimizer was configured with (per-parameter arguments
    included); a learning-rate scheduler in ``svi.optim`` owns its rates instead (neither
    decayed nor annealed, nor stepped). The optimizer is left at the last rate, and a second
    call starts again from the configured rates and goes on from where the first left the
    guide. Ctrl-C (``KeyboardInterrupt``) ends training early: the best guide is restored
    (epochs) and the history so far is returned with ``"interrupted": True``.

    :param pyro.infer.SVI svi: the SVI object to step.
    :param args: the model's arguments.
    :param int num_steps: budget: the number of steps.
    :param float seconds: budget: wall-clock seconds.
    :param int max_epochs: epochs: upper bound (default: no bound).
    :param int steps_per_epoch: epochs: steps per epoch (default: the loss's).
    :param callable validation: epochs: ``validation() -> float``, lower is better.
    :param int patience: epochs without improvement before the first stop.
    :param int lr_decays: how many times to go on at a lower learning rate (``0``: stop at
        the first stop).
    :param float lr_factor: learning-rate multiplier at each decay.
    :param int decay_patience: patience after a decay.
    :param float average: epochs: keep an exponential moving average of the parameters
        with this decay per step (e.g. ``0.98``: a memory of about 50 steps) and validate,
        keep and leave behind the average instead of the last step's parameters (Polyak
        averaging, as ``torch.optim.swa_utils.get_ema_multi_avg_fn``), which smooths the
        noise of small minibatches. ``None``: the last step's parameters.
    :param bool anneal: budget: anneal the learning rate over the budget.
    :param bool progress: show a tqdm progress bar (default: when standard error is a
        terminal).
    :returns: epochs: ``{"train_loss": [...], "validation_loss": [...], "best_epoch": int,
        "epochs": int, "decay_epochs": [...], "interrupted": bool}`` (per epoch); budget:
        ``{"train_loss": [...], "steps": int, "seconds": float, "interrupted": bool}``
        (per step).

    References

    [1] SGDR: Stochastic Gradient Descent with Warm Restarts, I. Loshchilov, F. Hutter (2017)
    """
    if progress is None:
        progress = sys.stderr.isatty()
    # SVI keeps the loss object's bound methods.
    loss = getattr(svi.loss_and_grads, "__self__", None)
    if steps_per_epoch is None:
        steps_per_epoch = getattr(loss, "steps_per_epoch", None)
    if steps_per_epoch is None:
        if max_epochs is not None or validation is not None:
            raise ValueError(
                "fit: max_epochs and validation need epochs: give steps_per_epoch (or a loss "
                "with a simulation bank); a budget is num_steps or seconds."
            )
        if average is not None:
            raise ValueError(
                "fit: average is validated and kept per epoch: give steps_per_epoch (or a loss "
                "with a simulation bank)."
            )
        return _fit_budget(svi, args, kwargs, num_steps, seconds, anneal, progress)
    if num_steps is not None or seconds is not None:
        raise ValueError(
            "fit: with epochs, training ends by early stopping on the validation loss (bound "
            "it with max_epochs); num_steps and seconds are budgets without epochs."
        )
    if validation is None:
        if not hasattr(loss, "validation_loss"):
            raise ValueError("fit: epochs need validation=callable returning a loss.")

        def validation():
            return loss.validation_loss(svi.model, svi.guide, *args, **kwargs)

    if not 0 < lr_factor < 1:
        raise ValueError(f"fit: lr_factor must lie in (0, 1), got {lr_factor}.")
    if lr_decays < 0 or decay_patience < 1 or patience < 1 or steps_per_epoch < 1:
        raise ValueError(
            "fit: lr_decays must be >= 0 and patience, decay_patience, steps_per_epoch >= 1; "
            f"got {lr_decays}, {patience}, {decay_patience}, {steps_per_epoch}."
        )
    check_average(average)
    schedule = (patience, lr_decays, lr_factor, decay_patience, average)
    return _fit_epochs(
        svi, args, kwargs, steps_per_epoch, validation, max_epochs, schedule, progress
    )


def _fit_epochs(svi, args, kwargs, steps_per_epoch, validation, max_epochs, schedule, progress):
    patience, lr_decays, lr_factor, decay_patience, average = schedule
    epochs = range(max_epochs) if max_epochs is not None else itertools.count()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        epochs = bar = tqdm(epochs, desc="epochs")
    history = {
        "train_loss": [],
        "validation_loss": [],
        "best_epoch": -1,
        "epochs": 0,
        "decay_epochs": [],
        "interrupted": False,
    }
    best, best_state, stale = math.inf, None, 0
    rate = LearningRateFactor(svi.optim)
    rate.set(1.0)  # a second fit starts from the configured rates again
    averaged = _MovingAverage(average, svi.guide) if average is not None else None
    try:
        for epoch in epochs:
            losses = []
            if averaged is not None and averaged.params:
                averaged.refresh()
            for _ in range(steps_per_epoch):
                losses.append(svi.step(*args, **kwargs))
                if averaged is not None:
                    averaged.update()
            with averaged if averaged is not None else contextlib.nullcontext():
                val = validation()
                if val < best:
                    best_state = _snapshot(svi.guide)
            history["train_loss"].append(sum(losses) / len(losses))
            history["validation_loss"].append(val)
            history["epochs"] = epoch + 1
            if bar is not None:
                bar.set_postfix(train=history["train_loss"][-1], validation=val)
            if val < best:
                best, stale, history["best_epoch"] = val, 0, epoch
                continue
            stale += 1
            if stale < patience:
                continue
            if len(history["decay_epochs"]) >= lr_decays or not rate.controls:
                break
            rate.set(lr_factor ** (len(history["decay_epochs"]) + 1))
            # Go on from the best guide with smaller steps.
            _restore(svi.guide, best_state)
            if averaged is not None:
                averaged.reset()
            history["decay_epochs"].append(epoch)
            stale, patience = 0, decay_patience
    except KeyboardInterrupt:
        history["interrupted"] = True
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        _restore(svi.guide, best_state)
    return history


def _fit_budget(svi, args, kwargs, num_steps, seconds, anneal, progress):
    if num_steps is None and seconds is None:
        raise ValueError("fit: give a budget, num_steps or seconds (or epochs of a bank).")
    if (num_steps is not None and num_steps < 1) or (seconds is not None and seconds <= 0):
        raise ValueError(
            f"fit: num_steps must be >= 1 and seconds > 0; got {num_steps}, {seconds}."
        )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="steps")
    history = {"train_loss": [], "steps": 0, "seconds": 0.0, "interrupted": False}
    start = time.perf_counter()
    rate = LearningRateFactor(svi.optim)
    rate.set(1.0)  # a second fit starts from the configured rates again
    try:
        while True:
            spent = budget_spent(history["steps"], num_steps, time.perf_counter() - start, seconds)
            if spent >= 1:
                break
            # The torch optimizers exist from the first step on (Pyro creates them lazily).
            if anneal and history["steps"] > 0:
                rate.set(max(0.5 * (1 + math.cos(math.pi * spent)), FINAL_RATE))
            history["train_loss"].append(svi.step(*args, **kwargs))
            history["steps"] += 1
            if bar is not None:
                bar.update()
                bar.set_postfix(train=history["train_loss"][-1])
    except KeyboardInterrupt:
        history["interrupted"] = True
    finally:
        if bar is not None:
            bar.close()
    history["seconds"] = time.perf_counter() - start
    step = history["seconds"] / max(history["steps"], 1)
    if seconds is not None and step > seconds:
        # The clock is read between steps: a step longer than the budget overruns it.
        warnings.warn(
            f"fit: the budget was {seconds:g} s but training took {history['seconds']:.3g} s; "
            f"the clock is read between steps and a step took {step:.3g} s on average, "
            "longer than the whole budget. Give a budget "
            "of many steps' time, or fewer simulations per step.",
            UserWarning,
            stacklevel=3,
        )
    return history


def check_average(average: float | None) -> None:
    """Refuse a moving-average decay (``average`` of :func:`fit`) outside ``(0, 1)``."""
    if average is not None and not (isinstance(average, float | int) and 0 < average < 1):
        raise ValueError(f"average must lie in (0, 1) (a decay per step), got {average!r}.")


def budget_spent(steps, num_steps, elapsed, seconds):
    """The share of a budget spent: the larger of the two, where given."""
    shares = [0.0]
    if num_steps is not None:
        shares.append(steps / num_steps)
    if seconds is not None:
        shares.append(elapsed / seconds)
    return max(shares)


class _MovingAverage:
    """An exponential moving average of the parameters that training steps (the param
    store's and an ``nn.Module`` guide's own); as a context manager, it swaps the average
    in and the last step's parameters back out on exit. Not ``torch.optim.swa_utils.
    AveragedModel``: that averages a deep copy of one module, where a guide's parameters live
    in Pyro's param store (and a guide may be a plain function); the update is the same
    ``torch._foreach_lerp_`` its EMA uses."""

    def __init__(self, decay, guide):
        self.decay, self.guide = decay, guide
        self.params, self.values = [], []

    def _parameters(self):
        found = {id(p): p for _, p in pyro.get_param_store().named_parameters()}
        if isinstance(self.guide, torch.nn.Module):
            found.update((id(p), p) for p in self.guide.parameters())
        return [p for p in found.values() if p.requires_grad]

    @torch.no_grad()
    def refresh(self):
        """Take in the parameters that joined since the last call (each epoch: looking them
        up costs more than the update itself); they start their average where they are."""
        params = self._parameters()
        if [id(p) for p in params] != [id(p) for p in self.params]:
            old = {id(p): v for p, v in zip(self.params, self.values, strict=True)}
            self.values = [old.get(id(p), p.detach().clone()) for p in params]
            self.params = params

    @torch.no_grad()
    def update(self):
        if not self.params:  # the first step (or the first after a reset) starts the averages
            self.refresh()
        else:
            torch._foreach_lerp_(self.values, self.params, 1 - self.decay)

    def reset(self):
        self.params, self.values = [], []

    @torch.no_grad()
    def _swap(self):
        for p, v in zip(self.params, self.values, strict=True):
            last = p.detach().clone()
            p.copy_(v)
            v.copy_(last)

    def __enter__(self):
        self._swap()

    def __exit__(self, *exc):
        self._swap()


def _snapshot(guide):
    state = {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}
    module = copy.deepcopy(guide.state_dict()) if isinstance(guide, torch.nn.Module) else None
    return state, module


def _restore(guide, snapshot):
    state, module = snapshot
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, p in store.named_parameters():
            if name in state:
                p.copy_(state[name])
    if module is not None:
        guide.load_state_dict(module)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str | os.PathLike, svi: SVI) -> None:
    """Save what continuing training needs: the param store (unconstrained values), the
    optimizer's state, the loss's state (the discriminator of
    :class:`~pyro_jc.AdversarialELBO`), an ``nn.Module`` guide's ``state_dict`` and the
    random number generators (torch, Python, numpy). Plain tensors and containers only:
    :func:`load_checkpoint` reads the file with ``torch.load(weights_only=True)``, so a
    downloaded checkpoint cannot run code.

    :param str path: the file to write.
    :param pyro.infer.SVI svi: the SVI object being trained.
    """
    loss = getattr(svi.loss_and_grads, "__self__", None)
    rng = pyro.util.get_rng_state()
    numpy_state = rng["numpy"]
    state = {
        "params": {
            name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()
        },
        "optimizer": svi.optim.get_state(),
        "loss": loss.state_dict() if hasattr(loss, "state_dict") else None,
        "guide": (
            copy.deepcopy(svi.guide.state_dict())
            if isinstance(svi.guide, torch.nn.Module)
            else None
        ),
        "rng": {
            "torch": rng["torch"],
            "random": rng["random"],
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype("int64")),
                      *numpy_state[2:]],
        },
    }  # fmt: skip
    torch.save(state, path)


def load_checkpoint(path: str | os.PathLike, svi: SVI, map_location: Any = None) -> None:
    """Restore a :func:`save_checkpoint` into ``svi``, so that training continues as if it
    had not stopped (the same steps under the same seed).

    Every parameter must exist already, with its constraint: set up first with one
    ``svi.evaluate_loss(*args)`` (which steps no optimizer; the random state it uses is
    restored from the file). The optimizer's state is applied as its parameters join
    (at the next step). With a simulation bank, a checkpoint continues identically from the
    end of an epoch (the order of the epoch in progress is not saved).

    :param str path: the file :func:`save_checkpoint` wrote.
    :param pyro.infer.SVI svi: an SVI object built like the saved one.
    :param map_location: as for :func:`torch.load` (e.g. ``"cpu"``).
    """
    state = torch.load(path, map_location=map_location, weights_only=True)
    store = pyro.get_param_store()
    current = dict(store.named_parameters())
    missing = sorted(set(state["params"]) - set(current))
    if missing:
        raise ValueError(
            f"load_checkpoint: the param store has no {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Set the model and guide up first, with "
            "one svi.evaluate_loss(*args) (their param statements declare each parameter "
            "with its constraint), then load."
        )
    with torch.no_grad():
        for name, value in state["params"].items():
            if current[name].shape != value.shape:
                raise ValueError(
                    f"load_checkpoint: parameter {name!r} has shape {tuple(value.shape)} in the "
                    f"checkpoint but {tuple(current[name].shape)} here: the checkpoint is of "
                    "another model or guide."
                )
            current[name].copy_(value)
    svi.optim.set_state(state["optimizer"])
    loss = getattr(svi.loss_and_grads, "__self__", None)
    if state["loss"] is not None:
        loss.load_state_dict(state["loss"])
    if state["guide"] is not None:
        svi.guide.load_state_dict(state["guide"])
    numpy_state = state["rng"]["numpy"]
    pyro.util.set_rng_state(
        {
            "torch": state["rng"]["torch"],
            "random": _as_tuples(state["rng"]["random"]),
            "numpy": (numpy_state[0], numpy_state[1].numpy().astype("uint32"), *numpy_state[2:]),
        }
    )


def _as_tuples(value):
    """Python's random state, with the tuples that saving turned into lists restored."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value
