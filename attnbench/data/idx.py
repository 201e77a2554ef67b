"""IDX files (the MNIST format): ``fashion-mnist`` and ``mnist`` from a local folder of four files.

The folder holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``);
``train-images.idx3-ubyte`` style names are read too. The official test files are the test
split; validation is carved from the training files with the split seed.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from attnbench.data.base import DataError, DataSplits, _check_fractions, _official_test_splits
from attnbench.data.registry import register_dataset

__all__ = ["read_idx", "IDX_FILES", "FASHION_MNIST_ROOT", "FASHION_MNIST_CLASSES"]

#: Where Debian's package ``dataset-fashion-mnist`` installs the four files.
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
#: role -> the file's stem; what the loaders look for, in this order.
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_UBYTE = 0x08   # the IDX type code of unsigned bytes, the only type these data sets use


def _candidates(folder: Path, stem: str) -> list[Path]:
    dotted = stem.replace("-idx", ".idx")          # train-images.idx3-ubyte, as some mirrors name it
    return [folder / f"{name}{gz}" for name in (stem, dotted) for gz in ("", ".gz")]


def _find_files(name: str, folder: Path, how_to_get: str) -> dict[str, Path]:
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise DataError(f"{name}: '{folder}' {what}; expected a folder holding "
                        f"{', '.join(IDX_FILES.values())} (each optionally .gz); {how_to_get}")
    found, missing = {}, []
    for role, stem in IDX_FILES.items():
        path = next((p for p in _candidates(folder, stem) if p.is_file()), None)
        if path is None:
            missing.append(f"{stem}[.gz]")
        else:
            found[role] = path
    if missing:
        raise DataError(f"{name}: looked in '{folder}' and found no {', '.join(missing)}; {how_to_get}")
    return found


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:   # gzip.BadGzipFile is an OSError
        raise DataError(f"'{path}' cannot be read ({type(err).__name__}: {err}); expected an IDX file"
                        f"{', gzipped' if path.suffix == '.gz' else ''}") from None


def read_idx(path, ndim: int) -> np.ndarray:
    """The unsigned-byte array in IDX file ``path`` (gzipped when it ends in ``.gz``).

    IDX: 4 magic bytes (0, 0, type 0x08 = unsigned byte, number of dimensions), each dimension as
    a big-endian 32-bit integer, then the data. ``ndim`` is the expected number of dimensions
    (3 for images, 1 for labels).

    Raises:
        DataError: one line naming the file: unreadable, wrong magic number (not IDX, another
            type or another number of dimensions), or data shorter or longer than the header says.
    """
    path = Path(path)
    raw = _read_bytes(path)
    expected_magic = (_UBYTE << 8) | ndim
    kind = {1: "labels", 3: "images"}.get(ndim, f"{ndim}-d arrays")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        got = f"magic number 0x{magic:08x}" if magic is not None else f"only {len(raw)} bytes"
        raise DataError(f"'{path}' is not an IDX file of {kind} ({got}; expected 0x{expected_magic:08x}: "
                        f"unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"'{path}' is truncated: {len(raw)} bytes, fewer than its {header}-byte header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(shape)
    if len(raw) - header != size:
        state = "truncated" if len(raw) - header < size else "longer than its header says"
        raise DataError(f"'{path}' is {state}: header says {' x '.join(map(str, shape))} = {size} bytes of data, "
                        f"the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"'{labels_path}' holds {labels.shape[0]} labels but '{images_path}' holds "
                        f"{images.shape[0]} images; expected one label per image")
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"'{labels_path}' has label {int(labels.max())}; expected labels 0..{num_classes - 1}")
    return images[:, None], labels.astype(np.int64)   # (N, 1, H, W): one grey channel


def _load_idx(name: str, root: Path, seed: int, classes: list[str], how_to_get: str, img_size: int,
              val_fraction: float, max_train: Optional[int], max_test: Optional[int]) -> DataSplits:
    _check_fractions(name, val_fraction)
    files = _find_files(name, root, how_to_get)
    x_pool, y_pool = _read_pair(files["train_images"], files["train_labels"], len(classes))
    x_test, y_test = _read_pair(files["test_images"], files["test_labels"], len(classes))
    if x_pool.shape[1:] != x_test.shape[1:]:
        raise DataError(f"'{files['test_images']}' holds images of {x_test.shape[2]}x{x_test.shape[3]}, "
                        f"'{files['train_images']}' of {x_pool.shape[2]}x{x_pool.shape[3]}; expected one size")
    options = {"img_size": img_size, "val_fraction": val_fraction, "max_train": max_train, "max_test": max_test}
    return _official_test_splits(name, x_pool, y_pool, x_test, y_test, seed, val_fraction, max_train, max_test,
                                 img_size, classes, options)


@register_dataset("fashion-mnist", default_root=FASHION_MNIST_ROOT, flips_preserve_labels=True)
def _load_fashion_mnist(root: Path, seed: int, *, img_size: int = 28, val_fraction: float = 0.1,
                        max_train: Optional[int] = None, max_test: Optional[int] = None) -> DataSplits:
    """Fashion-MNIST (28x28 grey, 10 classes) from its IDX files; default folder: Debian's dataset-fashion-mnist."""
    # A mirrored shirt or shoe is still a shirt or a shoe: flips keep the labels.
    how_to_get = ("install them with 'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or set the data "
                  "root ('root:' in an experiment file) to a folder holding the four files")
    return _load_idx("fashion-mnist", root, seed, list(FASHION_MNIST_CLASSES), how_to_get, img_size, val_fraction,
                     max_train, max_test)


@register_dataset("mnist", needs_root=True)
def _load_mnist(root: Path, seed: int, *, img_size: int = 28, val_fraction: float = 0.1,
                max_train: Optional[int] = None, max_test: Optional[int] = None) -> DataSplits:
    """MNIST handwritten digits (28x28 grey, 10 classes) from its four IDX files in a local folder."""
    # A mirrored 2 or 7 is not a digit: flips are refused (the registry's default).
    how_to_get = "set the data root ('root:' in an experiment file) to a folder holding MNIST's four IDX files"
    return _load_idx("mnist", root, seed, [str(i) for i in range(10)], how_to_get, img_size, val_fraction,
                     max_train, max_test)
