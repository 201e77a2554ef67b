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
``fashion-mnist``
    Fashion-MNIST (70,000 28x28 grey images of clothes, 10 classes) from its four IDX files,
    by default where Debian's package ``dataset-fashion-mnist`` installs them
    (``/usr/share/datasets/fashion-mnist``); the official test set is the test split.
``mnist``
    MNIST's four IDX files in a local folder (the same format).

Each data set declares whether a horizontally mirrored image keeps its label (clothes, CIFAR-10
and the generated tasks do; digits do not); flip augmentation (:mod:`attnbench.data.augment`) is
refused where it does not.

Modules: :mod:`~attnbench.data.base` (splits, in-memory sets, normalisation),
:mod:`~attnbench.data.registry` (names, options, :func:`load_dataset`), one module per source
(:mod:`~attnbench.data.digits`, :mod:`~attnbench.data.idx`, :mod:`~attnbench.data.cifar10`,
:mod:`~attnbench.data.imagefolder`, :mod:`~attnbench.data.generated`), and
:mod:`~attnbench.data.augment` (batch augmentation during training).
"""
from __future__ import annotations

from attnbench.data.base import DataError, DataSplits, ImageTensorDataset, stratified_split
from attnbench.data.registry import (FLIPS_OPTION, dataset_options, flips_preserve_labels, list_datasets,
                                     load_dataset, register_dataset)
# Importing each source registers its data sets.
from attnbench.data import cifar10, digits, idx, imagefolder  # noqa: F401 - importing registers
from attnbench.data.generated import generate_marks, generate_pathfinder
from attnbench.data.imagefolder import LazyImageDataset

__all__ = [
    "DataError",
    "FLIPS_OPTION",
    "DataSplits",
    "ImageTensorDataset",
    "LazyImageDataset",
    "register_dataset",
    "list_datasets",
    "dataset_options",
    "flips_preserve_labels",
    "load_dataset",
    "stratified_split",
    "generate_pathfinder",
    "generate_marks",
]
