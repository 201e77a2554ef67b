"""IDX data sets (fashion-mnist, mnist): the reader on generated files, errors, and the real set where installed."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from attnbench import data
from attnbench.data.idx import FASHION_MNIST_ROOT, IDX_FILES, read_idx

STEMS = IDX_FILES


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic (0, 0, 0x08, ndim), big-endian dimensions, data."""
    array = np.asarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path, array, gz=False):
    raw = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_idx_folder(root, gz=False, n_train=100, n_test=20, size=28):
    """The four MNIST-style files: image i is filled with 10 * (i % 10), its label i % 10."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = np.repeat((labels * 10 + (split == "test")).astype(np.uint8), size * size).reshape(n, size, size)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    paths = {role: write_idx(root / STEMS[role], arrays[role], gz) for role in STEMS}
    return root, arrays, paths


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_reads_raw_and_gzipped_files(tmp_path, gz):
    root, arrays, paths = make_idx_folder(tmp_path / "mnist", gz=gz)
    assert paths["train_images"].name.endswith(".gz") == gz
    assert np.array_equal(read_idx(paths["train_images"], 3), arrays["train_images"])
    assert np.array_equal(read_idx(paths["test_labels"], 1), arrays["test_labels"])
    splits = data.load_dataset("mnist", root=root, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    assert (splits.num_classes, splits.in_chans, splits.img_size) == (10, 1, 28)
    # the official test files are the test split, in their order
    assert torch.equal(splits.test.labels, torch.from_numpy(arrays["test_labels"]).long())
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(arrays["test_images"]))
    assert not splits.flips_preserve_labels   # a mirrored digit is not a digit


def test_fashion_mnist_reads_a_given_root_and_its_options(tmp_path):
    root, _, _ = make_idx_folder(tmp_path / "fm", gz=True, n_train=100, n_test=30)
    splits = data.load_dataset("fashion-mnist", root=root, seed=1, img_size=14, max_train=60, max_test=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 10, 10)
    assert splits.img_size == 14 and splits.train.batch(torch.arange(2))[0].shape == (2, 1, 14, 14)
    assert splits.flips_preserve_labels and splits.classes[0] == "T-shirt/top"
    assert splits.summary()["data_max_train"] == 60
    # validation is carved from the training files with the split seed; the test split does not move
    whole = data.load_dataset("fashion-mnist", root=root, seed=1)
    again = data.load_dataset("fashion-mnist", root=root, seed=2)
    assert torch.equal(whole.test.labels, again.test.labels)
    assert not torch.equal(whole.val.labels, again.val.labels) or not torch.equal(whole.train.labels, again.train.labels)
    assert sorted(np.bincount(splits.train.labels.numpy())) == [5] * 10


def test_dotted_file_names_are_read(tmp_path):
    root, arrays, paths = make_idx_folder(tmp_path / "m")
    for path in paths.values():
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    assert len(data.load_dataset("mnist", root=root).test) == len(arrays["test_labels"])


def test_missing_files_say_where_and_how_to_get_them(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load_dataset("fashion-mnist", root=tmp_path)
    message = str(err.value)
    assert "\n" not in message and f"'{tmp_path}'" in message
    assert "apt-get install dataset-fashion-mnist" in message and "root" in message
    assert "t10k-labels-idx1-ubyte[.gz]" in message
    root, _, paths = make_idx_folder(tmp_path / "partial")
    paths["test_labels"].unlink()
    with pytest.raises(data.DataError, match=r"found no t10k-labels-idx1-ubyte\[\.gz\];"):
        data.load_dataset("mnist", root=root)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_dataset("mnist", root=tmp_path / "nowhere")


def _malform(paths, case):
    images, labels = paths["train_images"], paths["train_labels"]
    if case == "magic":            # a label file where the images belong
        images.write_bytes(labels.read_bytes())
        return images, "is not an IDX file of images (magic number 0x00000801; expected 0x00000803"
    if case == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
        return images, "is truncated: header says 100 x 28 x 28 = 78400 bytes of data, the file holds 78300"
    if case == "too-long":
        images.write_bytes(images.read_bytes() + b"\0")
        return images, "is longer than its header says"
    if case == "short-header":
        labels.write_bytes(bytes([0, 0, 8, 1, 0]))
        return labels, "is truncated: 5 bytes, fewer than its 8-byte header"
    if case == "count-mismatch":
        write_idx(labels, np.arange(99) % 10)
        return labels, "holds 99 labels but"
    if case == "label-range":
        write_idx(labels, np.full(100, 10))
        return labels, "has label 10; expected labels 0..9"
    if case == "not-gzip":
        bad = images.with_name(images.name + ".gz")
        images.unlink()
        bad.write_bytes(b"not gzip at all")
        return bad, "cannot be read (BadGzipFile"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["magic", "truncated", "too-long", "short-header", "count-mismatch", "label-range",
                                  "not-gzip"])
def test_malformed_files_are_one_line_naming_the_file(tmp_path, case):
    root, _, paths = make_idx_folder(tmp_path / "m")
    path, expected = _malform(paths, case)
    with pytest.raises(data.DataError) as err:
        data.load_dataset("mnist", root=root)
    message = str(err.value)
    assert "\n" not in message and f"'{path}'" in message and expected in message, message


installed = pytest.mark.skipif(not all((FASHION_MNIST_ROOT / f"{stem}.gz").is_file() for stem in STEMS.values()),
                               reason="Debian's dataset-fashion-mnist is not installed")


@installed
def test_the_installed_fashion_mnist():
    assert read_idx(FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz", 3).shape == (60000, 28, 28)
    test_labels = read_idx(FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz", 1)
    assert test_labels.shape == (10000,) and np.bincount(test_labels).tolist() == [1000] * 10
    splits = data.load_dataset("fashion-mnist", seed=0)   # the default root
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (60000, 10000)
    assert len(splits.val) == 6000
    assert (splits.num_classes, splits.in_chans, splits.img_size) == (10, 1, 28)
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert len(splits.classes) == 10 and splits.flips_preserve_labels
