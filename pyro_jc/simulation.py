"""Simulations from the model joint: :func:`simulate` draws a bank of pairs ``(z, x)``, and
:class:`SimulationBank` serves them through :mod:`torch.utils.data` (a map-style dataset
whose minibatches are fetched with one indexing each), so that losses and training loops
read banks as any torch dataset.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import pyro
import pyro.poutine as poutine
import pyro.util
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from .errors import JointContrastiveError, NonFiniteError, SimulatorError
from .joints import model_joint_pairs, values_trace
from .layout import ModelLayout
from .store import BankStore

__all__ = [
    "ChunkShuffle",
    "SimulationBank",
    "SimulationStream",
    "StoredBank",
    "batches",
    "simulate",
]


def simulate(
    model: Callable,
    *args: Any,
    num_simulations: int,
    batch_size: int | None = None,
    vectorize: bool = True,
    max_plate_nesting: int | None = None,
    progress: bool = False,
    num_workers: int = 1,
    path: str | os.PathLike | None = None,
    latents: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> dict:
    """Simulate a bank of pairs ``(z, x) ~ p(z, x)`` from ``model`` (observed sites released).

    The work is cut into chunks of ``batch_size`` pairs, each drawn in one vectorized model
    run under its own seed, taken from the global random state (``pyro.set_rng_seed``) at
    the start: a bank is reproducible for a given chunk size, and the global state moves on
    by one draw whatever the bank's size. What a failure or an interrupt stops is kept:

    * a simulator that raises stops the run with the error, which names the chunk and keeps
      the simulations finished before it in its ``simulations`` attribute (a bank);
      ``Implicit(on_invalid="drop")`` drops the draws that raise instead (counted with the
      invalid ones, the first traceback shown);
    * Ctrl-C (``KeyboardInterrupt``) returns the finished chunks as a smaller bank, with a
      warning.

    :param model: a Pyro model; ``args``/``kwargs`` as for training (they fix plate sizes).
    :param int num_simulations: number of pairs to keep.
    :param int batch_size: pairs per chunk (one vectorized model run); default
        ``max(100, ceil(num_simulations / 100))``, so that progress moves by at most a
        hundredth of the work.
    :param bool vectorize: run the model in a plate over simulations (default); ``False``
        runs it once per pair (for models with Python control flow on sampled values).
    :param int max_plate_nesting: the model's plate depth (found from one run if omitted).
    :param bool progress: show a tqdm progress bar, advanced after every chunk.
    :param int num_workers: worker processes drawing chunks in parallel through joblib (the
        ``parallel`` extra; ``-1``: one per core). The bank is the same as with one worker
        (each chunk has its own seed, numpy's included). Under ``joblib.parallel_config(
        backend="dask")`` with a ``dask.distributed`` client open, or Ray's joblib backend,
        the chunks run on that cluster. The model, its arguments and the param store are
        pickled to the workers (cloudpickle: closures and numpy simulators are fine).
    :param path: a directory to keep the bank in (a :class:`~pyro_jc.store.BankStore`):
        every chunk is written as soon as it is drawn, all of ``batch_size`` pairs, so a
        second call with the same path draws only what is missing, after Ctrl-C, a crash or
        a failure, or to grow the bank (a larger ``num_simulations``), and gives the bank an
        uninterrupted run would have. The store must belong to this model and these
        arguments' shapes (checked); its seed and chunk size are its own.
    :param dict latents: simulate at these latents instead of prior draws (``{site:
        tensor}`` for every latent site, ``num_simulations`` along dim 0 in a bank's
        layout, e.g. a proposal's draws from
        :class:`~pyro_jc.sequential.TruncatedPrior`): the model runs with them replayed,
        and the bank pairs them with their simulations (draws dropped as invalid are not
        replaced, so the bank may be smaller). Needs ``vectorize=True``, no ``path``.
    :returns: ``{"latents": {site: tensor}, "observations": {site: tensor},
        "num_invalid": int}``; every tensor has the simulations along dim 0 (the layout of
        a plate over simulations at dim ``-max_plate_nesting - 1``). Invalid draws (see
        ``Implicit(on_invalid="drop")``) are dropped and counted. Plain tensors: save with
        ``torch.save`` and load with ``torch.load(..., weights_only=True)``; serve them with
        :class:`SimulationBank`.
    :raises SimulatorError: a simulator failed (its ``simulations`` attribute holds the bank
        simulated before the failure).
    """
    if isinstance(num_simulations, bool) or not isinstance(num_simulations, int):
        raise TypeError(f"num_simulations must be an int, got {num_simulations!r}.")
    if num_simulations < 1:
        raise ValueError(f"num_simulations must be positive, got {num_simulations}.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers == 0:
        raise ValueError(
            f"num_workers must be a positive int (or -1 for one per core), got {num_workers!r}."
        )
    layout = ModelLayout(model, args, kwargs)
    layout.check_observed_shapes()
    if not layout.observed_sites:
        raise ValueError(
            "simulate found no observed site in the model: give the data with "
            "pyro.sample(name, dist, obs=data) so that it knows what to simulate."
        )
    nesting = layout.plate_nesting if max_plate_nesting is None else max_plate_nesting
    if latents is not None:
        _check_latents(layout, latents, num_simulations, vectorize, path)
    store = _store(path, layout, batch_size, num_simulations) if path is not None else None
    if store is not None:
        batch_size, base_seed = store.batch_size, store.base_seed
    else:
        batch_size = batch_size or max(100, math.ceil(num_simulations / 100))
        # One draw from the global state seeds every chunk: chunk k depends only on it.
        base_seed = int(torch.randint(2**62, ()))
    # Finished chunks: (index, latents, observations) in memory, or in the store.
    chunks, num_invalid, attempt = [], 0, 0
    kept = store.num_simulations if store is not None else 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_simulations, initial=min(kept, num_simulations), desc="simulate")
    runner = _Runner(model, args, kwargs, nesting, vectorize, num_workers, latents, batch_size)
    try:
        while kept < num_simulations and not (latents is not None and attempt):
            # A wave of chunks covers what is missing; draws dropped as invalid call for
            # another. The waves depend neither on the number of workers nor on the seeds.
            plan = _plan(num_simulations - kept, batch_size, attempt, store)
            try:
                # Workers hand chunks back as they finish; the bank keeps the chunks' order.
                for index, (z, x, invalid) in runner.run(plan, base_seed):
                    dropped = 0
                    if invalid is not None:
                        dropped = int(invalid.sum())
                        z = {k: v[~invalid] for k, v in z.items()}
                        x = {k: v[~invalid] for k, v in x.items()}
                    num_invalid += dropped
                    if store is not None:
                        store.write_chunk(index, z, x, dropped)
                    else:
                        chunks.append((index, z, x))
                    added = next(iter(x.values())).shape[0]
                    kept += added
                    if bar is not None:
                        bar.update(min(added, num_simulations - bar.n))
            except Exception as e:
                # pyro_jc's errors keep their class; anything else the model or simulator
                # raised becomes a SimulatorError. Either way the finished chunks are kept.
                cls = type(e) if isinstance(e, JointContrastiveError) else SimulatorError
                failed = getattr(e, "_pyro_jc_chunk", None)
                done = _finished(chunks, store, num_simulations, num_invalid)
                raise _stopped(e, cls, failed, kept, num_simulations, done, path) from e
            attempt += len(plan)
            if num_invalid > 10 * num_simulations:
                raise NonFiniteError(
                    f"simulate: {num_invalid} invalid simulations for {kept} valid ones; the "
                    "simulator fails on most of the prior. Restrict the prior."
                )
    except KeyboardInterrupt:
        if not kept:
            raise
        resume = f" (the store at {path} keeps them: call again to complete it)" if path else ""
        warnings.warn(
            f"simulate was interrupted: returning the {min(kept, num_simulations)} of "
            f"{num_simulations} simulations finished{resume}.",
            UserWarning,
            stacklevel=2,
        )
    finally:
        if bar is not None:
            bar.close()
    if num_invalid:
        warnings.warn(
            f"simulate dropped {num_invalid} invalid simulations (kept "
            f"{min(kept, num_simulations)}).",
            UserWarning,
            stacklevel=2,
        )
    return _finished(chunks, store, num_simulations, num_invalid)


class _Runner:
    """Runs chunks in this process, or in ``num_workers`` processes through joblib (loky by
    default; any joblib backend the caller configures, dask's or Ray's for a cluster)."""

    def __init__(
        self, model, args, kwargs, nesting, vectorize, num_workers, latents=None, batch_size=None
    ):
        self.job = (model, args, kwargs, nesting, vectorize)
        self.num_workers = num_workers
        # Given latents: chunk k simulates at rows [k * batch_size, k * batch_size + size).
        self.latents, self.batch_size = latents, batch_size
        if num_workers != 1:
            try:
                import joblib  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "simulate(num_workers=...) runs its workers through joblib, which is not "
                    'installed: pip install "pyro-jc[parallel]".'
                ) from e

    def run(self, chunks, base_seed):
        """Yield ``(chunk index, result)`` for the ``(index, size)`` pairs of ``chunks``: in
        order in this process, as they finish in workers."""
        if self.num_workers == 1:
            return (_run_chunk(*self.job, n, k, base_seed, self._at(k, n)) for k, n in chunks)
        from joblib import Parallel, delayed

        # Workers start with an empty param store: they get this one's (a model's
        # pyro.param values, e.g. a learned simulator parameter).
        params = pyro.get_param_store().get_state() if pyro.get_param_store() else None
        task = delayed(_run_chunk_in_worker)
        tasks = (task(*self.job, n, k, base_seed, params, self._at(k, n)) for k, n in chunks)
        try:
            parallel = Parallel(n_jobs=self.num_workers, return_as="generator_unordered")
        except ValueError as e:
            if "does not support return_as" not in str(e):
                raise
            return self._waves(Parallel, tasks)
        return parallel(tasks)

    def _at(self, chunk, size):
        if self.latents is None:
            return None
        start = chunk * self.batch_size
        return {k: v[start : start + size] for k, v in self.latents.items()}

    def _waves(self, Parallel, tasks):
        """For backends that only return whole lists (Ray's): waves of a few chunks per
        worker, so that a failure or Ctrl-C loses at most the current wave."""
        wave = 4 * max(self.num_workers, 1)
        with Parallel(n_jobs=self.num_workers, return_as="list") as parallel:
            while batch := list(itertools.islice(tasks, wave)):
                yield from parallel(batch)


class SimulationStream:
    """Fresh simulations drawn ahead of training in worker processes: an iterator of
    ``(latents, observations, invalid)`` chunks of ``num`` pairs, ``prefetch`` of them in
    flight, so that a slow simulator's cost hides behind the optimizer's step (each pair is
    used once). Chunk ``k`` is seeded from the global random state at creation, as in
    :func:`simulate`; the workers get the param store as it is then.

    :param model: the model; ``args``/``kwargs`` its arguments (they fix plate sizes).
    :param int num: pairs per chunk (one training step's).
    :param int nesting: the model's plate depth.
    :param int num_workers: worker processes (joblib's loky executor, reused across calls
        and shared with :func:`simulate`'s workers).
    :param int prefetch: chunks in flight (default: twice the workers).
    :param bool vectorize: one vectorized model run per chunk (``False``: one per pair).
    """

    def __init__(
        self, model, args, kwargs, num, nesting, num_workers, prefetch=None, vectorize=True
    ):
        try:
            from joblib.executor import get_memmapping_executor
        except ImportError as e:
            raise ImportError(
                "Simulating in worker processes needs joblib, which is not installed: "
                'pip install "pyro-jc[parallel]".'
            ) from e
        # joblib's own executor: loky's process-wide reusable one, set up as joblib's
        # Parallel (used by simulate) expects to find it when it reuses it.
        self._executor = get_memmapping_executor(num_workers)
        self._job = (model, args, kwargs, nesting, vectorize, num)
        self._prefetch = prefetch or 2 * num_workers
        self._base_seed = int(torch.randint(2**62, ()))
        self._params = pyro.get_param_store().get_state() if pyro.get_param_store() else None
        self._pending = collections.deque()
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self):
        while len(self._pending) < self._prefetch:
            model, args, kwargs, nesting, vectorize, num = self._job
            future = self._executor.submit(
                _run_chunk_in_worker,
                model, args, kwargs, nesting, vectorize, num, self._next, self._base_seed,
                self._params,
            )  # fmt: skip
            self._pending.append(future)
            self._next += 1
        _, result = self._pending.popleft().result()
        return result

    def close(self):
        """Cancel the chunks not started yet."""
        while self._pending:
            self._pending.popleft().cancel()

    def __del__(self):
        self.close()


def _run_chunk(model, args, kwargs, nesting, vectorize, num, chunk, base_seed, latents=None):
    if latents is not None:
        model = poutine.replay(model, trace=values_trace(latents))
    try:
        with _seeded(base_seed + chunk):
            return chunk, _simulate_chunk(model, args, kwargs, num, nesting, vectorize)
    except Exception as e:
        e._pyro_jc_chunk = chunk  # for the error that keeps the finished chunks
        raise


def _run_chunk_in_worker(
    model, args, kwargs, nesting, vectorize, num, chunk, base_seed, params, latents=None
):
    # One torch thread per worker: the workers are the parallelism.
    torch.set_num_threads(1)
    if params is not None:
        pyro.get_param_store().set_state(params)
    return _run_chunk(model, args, kwargs, nesting, vectorize, num, chunk, base_seed, latents)


def _plan(missing, batch_size, first, store):
    """``(index, size)`` of the chunks that draw ``missing`` more pairs: consecutive
    indices from ``first``, the last one smaller, in memory; in a store, every chunk full
    (chunk ``k`` is then the same in any run) and the lowest indices not yet written."""
    count = math.ceil(missing / batch_size)
    if store is None:
        return [(first + i, min(batch_size, missing - i * batch_size)) for i in range(count)]
    done, plan, index = store.chunks, [], 0
    while len(plan) < count:
        if index not in done:
            plan.append((index, batch_size))
        index += 1
    return plan


def _store(path, layout, batch_size, num_simulations):
    sites = {
        part: {name: _trimmed(layout.site(name)["fn"].shape()) for name in names}
        for part, names in (
            ("latents", layout.latent_sites),
            ("observations", layout.observed_sites),
        )
    }
    if BankStore.exists(path):
        store = BankStore.open(path)
        store.check(sites, batch_size)
        return store
    batch_size = batch_size or max(100, math.ceil(num_simulations / 100))
    return BankStore.create(path, sites, batch_size, int(torch.randint(2**62, ())))


def _finished(chunks, store, num_simulations, num_invalid):
    """The bank of what is finished: the store's, or the chunks in memory in index order."""
    if store is not None:
        return store.load(num_simulations) if store.chunks else None
    if not chunks:
        return None
    ordered = [(z, x) for _, z, x in sorted(chunks, key=lambda c: c[0])]
    bank = _concatenated(ordered, num_simulations)
    bank["num_invalid"] = num_invalid
    return bank


def _simulate_chunk(model, args, kwargs, num, nesting, vectorize):
    if vectorize:
        return model_joint_pairs(model, args, kwargs, num, nesting)
    pairs = [model_joint_pairs(model, args, kwargs, None, nesting, pad=True) for _ in range(num)]
    z = {k: torch.cat([p[0][k] for p in pairs]) for k in pairs[0][0]}
    x = {k: torch.cat([p[1][k] for p in pairs]) for k in pairs[0][1]}
    masks = [p[2] if p[2] is not None else torch.zeros(1, dtype=torch.bool) for p in pairs]
    invalid = torch.cat(masks) if any(p[2] is not None for p in pairs) else None
    return z, x, invalid


def _concatenated(chunks, limit):
    return {
        part: {k: torch.cat([c[i][k] for c in chunks])[:limit] for k in chunks[0][i]}
        for i, part in enumerate(("latents", "observations"))
    }


def _stopped(error, cls, chunk, kept, num_simulations, bank, path):
    if isinstance(error, JointContrastiveError) and error.args:
        # Pyro appends the trace's shapes to errors raised inside a model: leave them out.
        message = str(error.args[0]).split("\nTrace Shapes:")[0]
    else:
        message = f"{type(error).__name__}: {error}"
    if bank is None:
        kept_note = "No simulation had finished before it."
    else:
        kept_note = (
            f"The {kept} simulations finished before it are kept in this error's "
            "`simulations` attribute, a bank for SimulationBank or ForwardKL(simulations=...)"
            + (f", and in the store at {path} (call again to complete it)." if path else ".")
        )
    where = f"in chunk {chunk}" if chunk is not None else "in a chunk"
    stopped = cls(
        f"simulate stopped {where} (after {kept} of {num_simulations} simulations): "
        f"{message}\n{kept_note}"
    )
    stopped.simulations = bank
    return stopped


@contextmanager
def _seeded(seed):
    """Run under ``pyro.set_rng_seed(seed)`` (torch, numpy and Python), then restore the
    random state, CUDA's included when it is in use. (Not ``torch.random.fork_rng``: it
    records stack traces for lazily initialized devices, a cost per chunk.)"""
    state = pyro.util.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    pyro.set_rng_seed(seed % 2**32)
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class SimulationBank(Dataset):
    """A bank of simulated pairs as a :class:`torch.utils.data.Dataset`: item ``i`` is
    ``({site: latent_i}, {site: observation_i})``, and a list or tensor of indices fetches
    a minibatch with one indexing per site (see :func:`batches`).

    :param dict simulations: a bank from :func:`simulate` (``{"latents": {...},
        "observations": {...}}``, the simulations along dim 0).
    """

    def __init__(self, simulations: dict) -> None:
        try:
            self.latents = dict(simulations["latents"])
            self.observations = dict(simulations["observations"])
        except (KeyError, TypeError) as e:
            raise ValueError(
                "simulations must be a bank from pyro_jc.simulate: a dict with 'latents' and "
                "'observations' (dicts of tensors with simulations along dim 0)."
            ) from e
        sizes = {k: v.shape[0] for k, v in {**self.latents, **self.observations}.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"Bank tensors disagree on the number of simulations: {sizes}.")
        self.num_simulations = next(iter(sizes.values()))
        for part, values in (("latents", self.latents), ("observations", self.observations)):
            for name, value in values.items():
                if not torch.is_tensor(value):
                    raise ValueError(
                        f"Bank {part}[{name!r}] is a {type(value).__name__}, not a tensor."
                    )
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    bad = int((~torch.isfinite(value)).reshape(len(value), -1).any(-1).sum())
                    raise NonFiniteError(
                        f"Bank {part}[{name!r}] holds NaN or inf in {bad} of its "
                        f"{len(value)} simulations; drop them (simulate(...) with "
                        "Implicit(on_invalid='drop') does) before training."
                    )

    def check_layout(self, layout):
        """Raise ``ValueError`` unless this bank was simulated from the model of ``layout``
        (a :class:`~pyro_jc.layout.ModelLayout`): the same latent and observed sites, each
        simulation shaped like the site (the data-set size included).
        """
        _check_shapes(
            layout,
            {k: v.shape[1:] for k, v in self.latents.items()},
            {k: v.shape[1:] for k, v in self.observations.items()},
        )

    def head(self, num: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(latents, observations)`` of the first ``num`` simulations (all if fewer)."""
        return (
            {k: v[:num] for k, v in self.latents.items()},
            {k: v[:num] for k, v in self.observations.items()},
        )

    def __len__(self) -> int:
        return self.num_simulations

    def __getitem__(self, index):
        if isinstance(index, list):  # a BatchSampler's minibatch: one indexing per site
            index = torch.as_tensor(index)
        return (
            {k: v[index] for k, v in self.latents.items()},
            {k: v[index] for k, v in self.observations.items()},
        )

    def split(
        self, validation_fraction: float, generator: torch.Generator | None = None
    ) -> tuple[SimulationBank, SimulationBank | None]:
        """A random split into training and validation parts.

        :param float validation_fraction: share of the simulations held out, in ``[0, 1)``.
        :param torch.Generator generator: random source (default: torch's global one).
        :returns: ``(train, validation)`` banks (``validation`` is ``None`` for a fraction
            of 0).
        """
        n = len(self)
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
        num_val = int(round(validation_fraction * n))
        if validation_fraction > 0 and (num_val == 0 or num_val == n):
            raise ValueError(
                f"A bank of {n} simulations is too small for validation_fraction="
                f"{validation_fraction}."
            )
        perm = torch.randperm(n, generator=generator)
        train = SimulationBank(self._bank(perm[num_val:]))
        validation = SimulationBank(self._bank(perm[:num_val])) if num_val else None
        return train, validation

    def shard(self, rank: int, world_size: int) -> SimulationBank:
        """Rank ``rank``'s share of ``world_size`` equal, disjoint shares (every
        ``world_size``-th simulation; the remainder is left out, so that every rank runs the
        same number of steps).

        :param int rank: this process's rank, in ``[0, world_size)``.
        :param int world_size: the number of processes.
        """
        size = _shard_size(len(self), rank, world_size)
        return SimulationBank(self._bank(torch.arange(size) * world_size + rank))

    def _bank(self, index):
        latents, observations = self[index]
        return {"latents": latents, "observations": observations}

    def all(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(latents, observations)``: every simulation, ``{site: tensor}`` each."""
        return self.latents, self.observations


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    **loader: Any,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` of minibatches of ``dataset`` (a
    :class:`SimulationBank`), each fetched with one indexing: a
    :class:`~torch.utils.data.BatchSampler` hands the dataset whole lists of indices
    (``batch_size=None`` turns off per-item collation).

    :param int batch_size: pairs per minibatch.
    :param bool shuffle: a new random order at every pass (an epoch).
    :param torch.Generator generator: random source of the order.
    :param bool drop_last: leave out a last, smaller minibatch.
    :param loader: further arguments of the DataLoader (``num_workers``, ``pin_memory``).
    """
    if shuffle and isinstance(dataset, StoredBank):
        # Random access across a bank on disk would read a chunk per item: shuffle by chunk.
        batch_sampler = ChunkShuffle(dataset, batch_size, generator=generator, drop_last=drop_last)
    else:
        sampler = (
            RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        )
        batch_sampler = BatchSampler(sampler, batch_size, drop_last)
    return DataLoader(dataset, batch_size=None, sampler=batch_sampler, **loader)


def _check_latents(layout, latents, num_simulations, vectorize, path):
    """Latents given to :func:`simulate`: every latent site, ``num_simulations`` rows each in
    a bank's layout."""
    if not vectorize or path is not None:
        raise ValueError(
            "simulate(latents=...) replays the latents in one vectorized run per chunk, in "
            "memory: it needs vectorize=True and no path."
        )
    if not isinstance(latents, dict):
        raise TypeError(f"latents must be a dict {{site: tensor}}, got {type(latents).__name__}.")
    for name, value in latents.items():
        if not torch.is_tensor(value) or value.dim() == 0 or len(value) != num_simulations:
            raise ValueError(
                f"simulate(latents=...): site {name!r} needs a tensor with num_simulations="
                f"{num_simulations} rows along dim 0, got "
                f"{tuple(value.shape) if torch.is_tensor(value) else type(value).__name__}."
            )
    observed = {name: layout.site(name)["fn"].shape() for name in layout.observed_sites}
    _check_shapes(layout, {k: v.shape[1:] for k, v in latents.items()}, observed)


def _check_shapes(layout, latents, observations):
    """``latents``/``observations``: ``{site: shape of one simulation}`` of a bank."""
    for part, names, values in (
        ("latents", layout.latent_sites, latents),
        ("observations", layout.observed_sites, observations),
    ):
        if set(values) != set(names):
            raise ValueError(
                f"The bank's {part} are {sorted(values)}, but the model's "
                f"{part[:-1] if part == 'latents' else 'observed'} sites are "
                f"{sorted(names)}: the bank was simulated from another model. Simulate "
                "a bank from this one with pyro_jc.simulate(model, *args, ...)."
            )
        for name in names:
            expected = _trimmed(layout.site(name)["fn"].shape())
            got = _trimmed(values[name])
            if got != expected:
                raise ValueError(
                    f"The bank's {part}[{name!r}] simulations have shape {got}, but the "
                    f"model's site {name!r} draws {expected} with these arguments: the "
                    "bank was simulated for a data set of another size (simulate it with "
                    "the arguments you train with), or the model is not vectorization-safe "
                    "(under a plate over simulations its sites gain dims: reduce over "
                    "event dims without keepdim, index from the right)."
                )


class StoredBank(Dataset):
    """A bank kept on disk (a :class:`~pyro_jc.store.BankStore`) served as a
    :class:`torch.utils.data.Dataset` without loading it whole: a minibatch reads the chunk
    files it needs, and at most ``cache_chunks`` chunks stay in memory. :func:`batches`
    shuffles it chunk-wise (see :class:`ChunkShuffle`), so a bank larger than memory
    trains with memory for a few chunks.

    :param store: a :class:`~pyro_jc.store.BankStore` (or its path).
    :param chunks: the chunk indices it serves (default: all, in order).
    :param int cache_chunks: chunks held in memory at once.
    :param int length: serve only the first ``length`` items of those chunks (what
        :meth:`shard` uses to give every rank an equal share).
    """

    def __init__(self, store, chunks=None, cache_chunks: int = 8, length=None) -> None:
        from collections import OrderedDict

        self.store = store if isinstance(store, BankStore) else BankStore.open(store)
        available = self.store.chunks
        self.chunks = sorted(available) if chunks is None else list(chunks)
        if not self.chunks:
            raise ValueError(f"The bank store at {self.store.path} holds no finished chunk.")
        sizes = [available[k]["kept"] for k in self.chunks]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        # A shard serves its first ``length`` items (equal shares across ranks).
        self.length = self.offsets[-1] if length is None else min(length, self.offsets[-1])
        self.cache_chunks = max(1, int(cache_chunks))
        self._cache = OrderedDict()
        #: Chunk files read so far (a bank too large for memory reads each once per pass).
        self.reads = 0

    def __len__(self) -> int:
        return self.length

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each chunk's items (those of the first ``len(self)``)."""
        ranges = zip(self.offsets[:-1], self.offsets[1:], strict=True)
        return [(a, min(b, self.length)) for a, b in ranges if a < self.length]

    def _chunk(self, position):
        if position in self._cache:
            self._cache.move_to_end(position)
            return self._cache[position]
        chunk = self.store.read_chunk(self.chunks[position])
        self.reads += 1
        self._cache[position] = chunk
        if len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return chunk

    def __getitem__(self, index):
        index = torch.as_tensor(index).reshape(-1)
        if len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(self):
            raise IndexError(f"index out of range for a stored bank of {len(self)} items")
        positions = torch.bucketize(index, torch.tensor(self.offsets[1:]), right=True)
        parts = {"latents": {}, "observations": {}}
        order = []
        for position in positions.unique().tolist():
            mask = positions == position
            local = index[mask] - self.offsets[position]
            chunk = self._chunk(position)
            for part in parts:
                for k, v in chunk[part].items():
                    parts[part].setdefault(k, []).append(v[local])
            order.append(mask.nonzero().flatten())
        # Back to the order asked for.
        inverse = torch.empty_like(index)
        inverse[torch.cat(order)] = torch.arange(len(index))
        return tuple(
            {k: torch.cat(v)[inverse] for k, v in parts[part].items()}
            for part in ("latents", "observations")
        )

    def split(self, validation_fraction: float, generator=None):
        """Training and validation parts by whole chunks (the last ones validate).

        :returns: ``(train, validation)`` (``validation`` is ``None`` for a fraction of 0).
        """
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
        num_val = math.ceil(validation_fraction * len(self.chunks)) if validation_fraction else 0
        if num_val >= len(self.chunks):
            raise ValueError(
                f"A stored bank of {len(self.chunks)} chunks cannot hold out "
                f"validation_fraction={validation_fraction} by whole chunks: simulate more "
                "chunks (a smaller batch_size) or lower the fraction."
            )
        if self.length < self.offsets[-1]:
            raise ValueError("Split a stored bank before sharding it, not after.")
        cut = len(self.chunks) - num_val
        train = StoredBank(self.store, self.chunks[:cut], self.cache_chunks)
        validation = StoredBank(self.store, self.chunks[cut:], self.cache_chunks)
        return train, (validation if num_val else None)

    def shard(self, rank: int, world_size: int) -> StoredBank:
        """Rank ``rank``'s share of ``world_size`` disjoint shares by whole chunks (every
        ``world_size``-th chunk, so that each rank reads only its own files), cut to the
        smallest share's size so that every rank runs the same number of steps.

        :param int rank: this process's rank, in ``[0, world_size)``.
        :param int world_size: the number of processes.
        """
        _shard_size(len(self.chunks), rank, world_size)  # checks the arguments
        sizes = [b - a for a, b in self.chunk_ranges()]
        shares = [sum(sizes[r::world_size]) for r in range(world_size)]
        if min(shares) == 0:
            raise ValueError(
                f"A stored bank of {len(self.chunks)} chunks cannot give each of "
                f"{world_size} ranks a chunk: simulate more chunks (a smaller batch_size)."
            )
        return StoredBank(self.store, self.chunks[rank::world_size], self.cache_chunks, min(shares))

    def check_layout(self, layout):
        """As :meth:`SimulationBank.check_layout`, from the store's manifest."""
        sites = self.store.manifest["sites"]
        _check_shapes(layout, sites["latents"], sites["observations"])

    def head(self, num: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(latents, observations)`` of the first ``num`` simulations (all if fewer)."""
        return self[torch.arange(min(num, len(self)))]


class ChunkShuffle(Sampler):
    """Minibatches of indices of a :class:`StoredBank`, shuffled chunk-wise: each pass takes
    the chunks in a random order, ``buffer_chunks`` at a time, and shuffles the items of
    those chunks together (the buffer of a streaming loader), so that each chunk file is
    read once per pass.

    :param StoredBank bank: the bank.
    :param int batch_size: items per minibatch.
    :param int buffer_chunks: chunks shuffled together (default: the bank's cache).
    :param torch.Generator generator: random source.
    :param bool drop_last: leave out a last, smaller minibatch.
    """

    def __init__(self, bank, batch_size, buffer_chunks=None, generator=None, drop_last=False):
        self.ranges = bank.chunk_ranges()
        self.batch_size = batch_size
        self.buffer_chunks = buffer_chunks or bank.cache_chunks
        self.generator = generator
        self.drop_last = drop_last

    def __iter__(self):
        order = torch.randperm(len(self.ranges), generator=self.generator).tolist()
        carry = torch.empty(0, dtype=torch.long)
        for i in range(0, len(order), self.buffer_chunks):
            group = [torch.arange(*self.ranges[k]) for k in order[i : i + self.buffer_chunks]]
            items = torch.cat(group)
            items = torch.cat([carry, items[torch.randperm(len(items), generator=self.generator)]])
            whole = len(items) // self.batch_size * self.batch_size
            for start in range(0, whole, self.batch_size):
                yield items[start : start + self.batch_size].tolist()
            carry = items[whole:]
        if len(carry) and not self.drop_last:
            yield carry.tolist()

    def __len__(self):
        total = sum(stop - start for start, stop in self.ranges)
        return total // self.batch_size if self.drop_last else math.ceil(total / self.batch_size)


def _shard_size(n, rank, world_size):
    """Items in each of ``world_size`` equal shares of ``n`` (the arguments checked)."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"shard: {name} must be an int, got {value!r}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: need 0 <= rank < world_size, got {rank} and {world_size}.")
    if n < world_size:
        raise ValueError(f"A bank of {n} cannot be shared among {world_size} ranks.")
    return n // world_size


def _trimmed(shape):
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape
