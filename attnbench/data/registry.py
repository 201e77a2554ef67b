"""The registry of data sets and the front door, :func:`load_dataset`."""
from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from attnbench.data.base import DataError, DataSplits
from attnbench.suggest import did_you_mean

@dataclasses.dataclass(frozen=True)
class _DatasetEntry:
    name: str
    loader: Callable[..., DataSplits]
    needs_root: bool
    default_root: Optional[Path]
    flips_preserve_labels: bool
    description: str


_DATASETS: dict[str, _DatasetEntry] = {}

#: A loader option by this name lets the user declare flips label-preserving (image folders).
FLIPS_OPTION = "flips_preserve_labels"


def register_dataset(name: str, *, needs_root: bool = False, default_root: Optional[Union[str, os.PathLike]] = None,
                     flips_preserve_labels: bool = False):
    """Register ``loader(root, seed, **options) -> DataSplits`` under ``name`` (a decorator).

    Options are the loader's keyword-only parameters; their defaults are the documented ones.
    ``needs_root``: the loader reads local files, from ``root`` or, when the caller gives none,
    ``default_root`` (where a system package installs them). ``flips_preserve_labels``: whether a
    horizontally mirrored image keeps its class (a shirt does, a "2" does not); augmentation by
    flips is refused otherwise. A loader option of that name overrides the declaration.
    """

    def add(loader):
        doc = (loader.__doc__ or "").strip().splitlines()
        _DATASETS[name] = _DatasetEntry(name, loader, needs_root or default_root is not None,
                                        Path(default_root) if default_root is not None else None,
                                        flips_preserve_labels, doc[0] if doc else "")
        return loader

    return add


def list_datasets() -> list[str]:
    """Sorted names of the registered data sets."""
    return sorted(_DATASETS)


def dataset_options(name: str) -> dict[str, Any]:
    """The options of data set ``name`` with their defaults."""
    entry = _entry(name)
    return {p.name: p.default for p in inspect.signature(entry.loader).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def flips_preserve_labels(name: str, options: Optional[dict[str, Any]] = None) -> bool:
    """Whether horizontal flips keep the labels of data set ``name`` (given its ``options``)."""
    entry = _entry(name)
    if FLIPS_OPTION in dataset_options(name):
        return bool((options or {}).get(FLIPS_OPTION, dataset_options(name)[FLIPS_OPTION]))
    return entry.flips_preserve_labels


def _entry(name: str) -> _DatasetEntry:
    if name not in _DATASETS:
        raise DataError(f"unknown dataset '{name}'{did_you_mean(name, _DATASETS)} "
                        f"(known: {', '.join(list_datasets())})")
    return _DATASETS[name]


def load_dataset(name: str = "digits", root: Optional[Union[str, os.PathLike]] = None, seed: int = 0,
                 **options) -> DataSplits:
    """Load a registered data set and split it deterministically.

    Args:
        name: ``digits`` (default), ``fashion-mnist``, ``mnist``, ``pathfinder``, ``marks``,
            ``imagefolder``, ``cifar10`` or a name added with :func:`register_dataset`.
        root: local path, for the data sets read from disk (refused by the embedded ones);
            ``fashion-mnist`` defaults to where Debian's package installs it.
        seed: the split seed: the same seed gives the same splits.
        **options: the data set's options (see :func:`dataset_options`), e.g. ``img_size``.

    Raises:
        DataError: unknown name or option, a missing or malformed path (the message names the
            path and what was expected).
    """
    entry = _entry(name)
    accepted = dataset_options(name)
    for key in options:
        if key not in accepted:
            raise DataError(f"dataset '{name}': unknown option '{key}'{did_you_mean(key, accepted)} "
                            f"(accepted: {', '.join(accepted) or 'none'})")
    if root is None:
        root = entry.default_root
    if entry.needs_root and root is None:
        raise DataError(f"dataset '{name}' reads local files: pass root=<path>")
    if not entry.needs_root and root is not None:
        raise DataError(f"dataset '{name}' is embedded and takes no root (got '{root}')")
    splits = entry.loader(Path(root), int(seed), **options) if entry.needs_root else entry.loader(int(seed), **options)
    splits.flips_preserve_labels = flips_preserve_labels(name, options)
    return splits
