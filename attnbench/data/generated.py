"""Generated tasks that need global context: pathfinder (follow a path) and marks (match two glyphs)."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from attnbench.data.base import DataError, DataSplits, _check_fractions, _in_memory_splits, stratified_split
from attnbench.data.registry import register_dataset

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


@register_dataset("pathfinder", flips_preserve_labels=True)   # a mirrored path still joins its ends
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


@register_dataset("marks", flips_preserve_labels=True)   # both glyphs mirror alike: same stays same
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


