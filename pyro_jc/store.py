"""Banks of simulations on disk: a directory of chunk files and a JSON manifest, written
chunk by chunk as :func:`~pyro_jc.simulate` draws them, so that an interrupted or failed run
loses nothing and a second call completes or grows the bank.

Format: ``manifest.json`` (the model's sites with their per-simulation shapes and dtypes,
the seed and size of the chunks, and for each finished chunk its file, the pairs kept and
the draws dropped as invalid) and one ``chunk-NNNNNNNN.pt`` per chunk, a dict of tensors
written by :func:`torch.save` and read with ``torch.load(weights_only=True)``: opening a
store never unpickles arbitrary objects. Files are written to a temporary name and moved
into place, so a crash leaves either a whole chunk or none. Plain files need no extra
dependency and serve any filesystem; a bank too large for memory is read chunk by chunk
(:meth:`BankStore.read_chunk`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["BankStore"]

_FORMAT = "pyro_jc.bank"
_VERSION = 1


class BankStore:
    """A bank of simulations on disk (see the module's description).

    :param path: the store's directory.
    :param dict manifest: its manifest (use :meth:`open` or :meth:`create`).
    """

    def __init__(self, path: str | os.PathLike, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def exists(cls, path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a store."""
        return (Path(path) / "manifest.json").is_file()

    @classmethod
    def open(cls, path: str | os.PathLike) -> BankStore:
        """Open the store at ``path``."""
        try:
            manifest = json.loads((Path(path) / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable pyro_jc bank store: {e}") from e
        if manifest.get("format") != _FORMAT or manifest.get("version") != _VERSION:
            raise ValueError(
                f"{path}/manifest.json is not a pyro_jc bank store of version {_VERSION}."
            )
        return cls(path, manifest)

    @classmethod
    def create(
        cls, path: str | os.PathLike, sites: dict, batch_size: int, base_seed: int
    ) -> BankStore:
        """Create an empty store at ``path`` (a new or empty directory).

        :param dict sites: ``{"latents": {name: shape}, "observations": {name: shape}}``,
            the per-simulation shape of every site (they must match when it is opened
            again).
        :param int batch_size: pairs drawn per chunk.
        :param int base_seed: chunk ``k`` is drawn under seed ``base_seed + k``.
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise ValueError(
                f"{path} exists and is not empty, but holds no pyro_jc bank store "
                "(manifest.json): give a new or empty directory."
            )
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": _FORMAT,
            "version": _VERSION,
            "sites": {part: {k: list(v) for k, v in s.items()} for part, s in sites.items()},
            "dtypes": {},
            "batch_size": batch_size,
            "base_seed": base_seed,
            "chunks": {},
        }
        store = cls(path, manifest)
        store._write_manifest()
        return store

    def check(self, sites: dict, batch_size: int | None) -> None:
        """Raise ``ValueError`` unless this store holds simulations of a model with these
        sites and per-simulation shapes (``sites`` as in :meth:`create`), drawn in chunks
        of ``batch_size`` (``None``: any)."""
        stored = {p: {k: tuple(v) for k, v in s.items()} for p, s in self.manifest["sites"].items()}
        wanted = {p: {k: tuple(v) for k, v in s.items()} for p, s in sites.items()}
        if stored != wanted:
            raise ValueError(
                f"The bank store at {self.path} holds simulations of sites {stored} (shapes "
                f"per simulation), but this model with these arguments has {wanted}: it "
                "belongs to another model or data-set size. Give another path."
            )
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError(
                f"The bank store at {self.path} was drawn in chunks of {self.batch_size}; "
                f"batch_size={batch_size} would draw other simulations. Leave batch_size out "
                "(the store's is used) or give another path."
            )

    # -- contents ---------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.manifest["batch_size"]

    @property
    def base_seed(self) -> int:
        return self.manifest["base_seed"]

    @property
    def chunks(self) -> dict[int, dict]:
        """``{chunk index: {"file", "kept", "invalid"}}`` of the finished chunks."""
        return {int(k): v for k, v in self.manifest["chunks"].items()}

    @property
    def num_simulations(self) -> int:
        """Pairs held (all finished chunks)."""
        return sum(c["kept"] for c in self.manifest["chunks"].values())

    def write_chunk(self, index: int, latents: dict, observations: dict, invalid: int) -> None:
        """Write chunk ``index`` (its valid pairs, ``{site: tensor}`` with the simulations
        along dim 0, moved to the CPU) and record it in the manifest."""
        part = {"latents": latents, "observations": observations}
        dtypes = {
            f"{p}/{k}": str(v.dtype).replace("torch.", "")
            for p, s in part.items()
            for k, v in s.items()
        }
        known = self.manifest["dtypes"]
        clash = {k: (known[k], v) for k, v in dtypes.items() if k in known and known[k] != v}
        if clash:
            raise ValueError(
                f"Chunk {index} has dtypes {clash} (stored, new) unlike the store's other "
                "chunks: the model changed since the store was started. Give another path."
            )
        known.update(dtypes)
        name = f"chunk-{index:08d}.pt"
        tensors = {p: {k: v.detach().cpu() for k, v in s.items()} for p, s in part.items()}
        _atomic(self.path / name, lambda f: torch.save(tensors, f))
        kept = next(iter(observations.values())).shape[0]
        self.manifest["chunks"][str(index)] = {"file": name, "kept": kept, "invalid": invalid}
        self._write_manifest()

    def read_chunk(self, index: int) -> dict:
        """``{"latents": {...}, "observations": {...}}`` of chunk ``index`` (on the CPU)."""
        entry = self.manifest["chunks"][str(index)]
        return torch.load(self.path / entry["file"], weights_only=True)

    def load(self, num_simulations: int | None = None) -> dict:
        """The first ``num_simulations`` pairs (default: all), chunks in index order, as a
        bank: ``{"latents", "observations", "num_invalid"}``."""
        parts = {"latents": {}, "observations": {}}
        num_invalid, total = 0, 0
        for index in sorted(self.chunks):
            if num_simulations is not None and total >= num_simulations:
                break
            chunk = self.read_chunk(index)
            for part in parts:
                for k, v in chunk[part].items():
                    parts[part].setdefault(k, []).append(v)
            total += self.chunks[index]["kept"]
            num_invalid += self.chunks[index]["invalid"]
        bank = {
            part: {k: torch.cat(v)[:num_simulations] for k, v in values.items()}
            for part, values in parts.items()
        }
        bank["num_invalid"] = num_invalid
        return bank

    def _write_manifest(self):
        text = json.dumps(self.manifest, indent=1)
        _atomic(self.path / "manifest.json", lambda f: f.write(text.encode()))


def _atomic(path, write):
    """Write through a temporary file moved into place: readers see all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
