"""Simulations from the model joint: :func:`simulate` draws a bank of pairs ``(z, x)``, and
:class:`SimulationBank` serves them through :mod:`torch.utils.data` (a map-style dataset
whose minibatches are fetched with one indexing each), so that losses and training loops
read banks as any torch dataset.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .errors import NonFiniteError
from .joints import model_joint_pairs
from .layout import ModelLayout

__all__ = ["SimulationBank", "batches", "simulate"]


def simulate(
    model: Callable,
    *args: Any,
    num_simulations: int,
    batch_size: int | None = None,
    vectorize: bool = True,
    max_plate_nesting: int | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> dict:
    """Simulate a bank of pairs ``(z, x) ~ p(z, x)`` from ``model`` (observed sites released).

    :param model: a Pyro model; ``args``/``kwargs`` as for training (they fix plate sizes).
    :param int num_simulations: number of pairs to keep.
    :param int batch_size: pairs per vectorized model run (default: all at once).
    :param bool vectorize: run the model in a plate over simulations (default); ``False``
        runs it once per pair (for models with Python control flow on sampled values).
    :param int max_plate_nesting: the model's plate depth (found from one run if omitted).
    :param bool progress: show a tqdm progress bar.
    :returns: ``{"latents": {site: tensor}, "observations": {site: tensor},
        "num_invalid": int}``; every tensor has the simulations along dim 0 (the layout of
        a plate over simulations at dim ``-max_plate_nesting - 1``). Invalid draws (see
        ``Implicit(on_invalid="drop")``) are dropped and counted. Plain tensors: save with
        ``torch.save`` and load with ``torch.load(..., weights_only=True)``; serve them with
        :class:`SimulationBank`.
    """
    if num_simulations < 1:
        raise ValueError(f"num_simulations must be positive, got {num_simulations}.")
    layout = ModelLayout(model, args, kwargs)
    layout.check_observed_shapes()
    if not layout.observed_sites:
        raise ValueError(
            "simulate found no observed site in the model: give the data with "
            "pyro.sample(name, dist, obs=data) so that it knows what to simulate."
        )
    nesting = layout.plate_nesting if max_plate_nesting is None else max_plate_nesting
    batch_size = batch_size or num_simulations
    latents, sims, num_invalid, kept = {}, {}, 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_simulations, desc="simulate")
    while kept < num_simulations:
        num = min(batch_size, num_simulations - kept) if vectorize else None
        z, x, invalid = model_joint_pairs(model, args, kwargs, num, nesting, pad=True)
        if invalid is not None:
            num_invalid += int(invalid.sum())
            z = {k: v[~invalid] for k, v in z.items()}
            x = {k: v[~invalid] for k, v in x.items()}
        for store, batch in ((latents, z), (sims, x)):
            for k, v in batch.items():
                store.setdefault(k, []).append(v)
        added = next(iter(x.values())).shape[0]
        kept += added
        if bar is not None:
            bar.update(added)
        if num_invalid > 10 * num_simulations:
            raise NonFiniteError(
                f"simulate: {num_invalid} invalid simulations for {kept} valid ones; the "
                "simulator fails on most of the prior. Restrict the prior."
            )
    if bar is not None:
        bar.close()
    if num_invalid:
        warnings.warn(
            f"simulate dropped {num_invalid} invalid simulations (kept {num_simulations}).",
            UserWarning,
            stacklevel=2,
        )
    return {
        "latents": {k: torch.cat(v)[:num_simulations] for k, v in latents.items()},
        "observations": {k: torch.cat(v)[:num_simulations] for k, v in sims.items()},
        "num_invalid": num_invalid,
    }


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
        for part, names, values in (
            ("latents", layout.latent_sites, self.latents),
            ("observations", layout.observed_sites, self.observations),
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
                got = _trimmed(values[name].shape[1:])
                if got != expected:
                    raise ValueError(
                        f"The bank's {part}[{name!r}] simulations have shape {got}, but the "
                        f"model's site {name!r} draws {expected} with these arguments: the "
                        "bank was simulated for a data set of another size (simulate it with "
                        "the arguments you train with), or the model is not vectorization-safe "
                        "(under a plate over simulations its sites gain dims: reduce over "
                        "event dims without keepdim, index from the right)."
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
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last), **loader
    )


def _trimmed(shape):
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape
