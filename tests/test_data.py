"""attnbench.data: embedded and generated data sets, local folders, splits and errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from attnbench import data

PATHFINDER_SMALL = {"num_samples": 200}


def make_image_folder(root, classes=("cat", "dog", "fox"), per_class=6, size=(12, 10)):
    """root/<class>/<i>.png, each class a different colour band, so it is learnable."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
            arr[..., c % 3] += 150
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def make_cifar_folder(root, per_batch=12, test=10):
    """A CIFAR-10 style 'cifar-10-batches-py' with tiny batches of random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        labels = [int(i % 10) for i in range(n)]
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        images[:, :1024] = (np.array(labels)[:, None] * 25).astype(np.uint8)   # red plane encodes the class
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": images, b"labels": labels, b"batch_label": name.encode()}, f)
    return folder


def assert_disjoint_and_covering(splits, total=None):
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert min(sizes) > 0
    if total is not None:
        assert sum(sizes) == total


def split_fingerprint(splits):
    return [ds.images.sum(dim=(1, 2, 3)) for ds in (splits.train, splits.val, splits.test)]


@pytest.mark.parametrize("name,options", [("digits", {}), ("pathfinder", PATHFINDER_SMALL),
                                          ("marks", {"num_samples": 200})])
def test_embedded_sets_load_deterministically(name, options):
    a = data.load_dataset(name, seed=3, **options)
    b = data.load_dataset(name, seed=3, **options)
    c = data.load_dataset(name, seed=4, **options)
    for x, y in zip(split_fingerprint(a), split_fingerprint(b)):
        assert torch.equal(x, y)
    assert not torch.equal(split_fingerprint(a)[0], split_fingerprint(c)[0])
    total = 1797 if name == "digits" else 200
    assert_disjoint_and_covering(a, total)
    x, y = a.train.batch(torch.arange(4))
    assert x.shape == (4, a.in_chans, a.img_size, a.img_size) and x.dtype == torch.float32
    assert int(y.max()) < a.num_classes
    # normalised with training statistics
    xs, _ = a.train.batch(torch.arange(len(a.train)))
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std()) - 1) < 1e-2


def test_splits_are_disjoint_and_stratified():
    labels = np.repeat(np.arange(5), 40)
    train, val, test = data.stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    assert len(np.intersect1d(train, val)) == len(np.intersect1d(train, test)) == len(np.intersect1d(val, test)) == 0
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(200))
    assert all((labels[test] == k).sum() == 8 for k in range(5))


def test_digits_resize_and_dataset_options():
    s = data.load_dataset("digits", img_size=16)
    assert s.train.batch(torch.arange(2))[0].shape == (2, 1, 16, 16)
    assert s.num_classes == 10 and s.in_chans == 1 and s.img_size == 16
    assert set(data.list_datasets()) >= {"digits", "pathfinder", "marks", "imagefolder", "cifar10"}
    assert data.dataset_options("digits")["val_fraction"] == 0.15


def test_pathfinder_is_balanced_and_has_no_distance_or_ink_shortcut():
    images, labels = data.generate_pathfinder(num_samples=200)
    assert images.shape == (200, 32, 32) and labels.mean() == 0.5
    # same ink per class (same number and length of paths and marks) up to rasterisation noise
    ink = images.reshape(200, -1).sum(1)
    assert abs(ink[labels == 0].mean() - ink[labels == 1].mean()) < 0.05 * ink.mean()
    again, _ = data.generate_pathfinder(num_samples=200)
    assert np.array_equal(images, again)


def test_image_folder_loads(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    s = data.load_dataset("imagefolder", root=root, seed=0, img_size=8, val_fraction=0.2, test_fraction=0.2)
    assert s.classes == ["cat", "dog", "fox"] and s.num_classes == 3 and s.in_chans == 3
    assert_disjoint_and_covering(s, 18)
    assert s.train.batch(torch.arange(2))[0].shape == (2, 3, 8, 8)
    gray = data.load_dataset("imagefolder", root=root, img_size=8, grayscale=True, in_memory=False)
    x, y = gray.train[0]
    assert x.shape == (1, 8, 8) and gray.in_chans == 1


def test_image_folder_with_train_and_test_trees(tmp_path):
    make_image_folder(tmp_path / "train", per_class=5)
    make_image_folder(tmp_path / "test", per_class=2)
    s = data.load_dataset("imagefolder", root=tmp_path, img_size=8, val_fraction=0.2)
    assert len(s.test) == 6 and len(s.train) + len(s.val) == 15


def test_cifar_folder_loads(tmp_path):
    folder = make_cifar_folder(tmp_path)
    for root in (tmp_path, folder):                   # the folder itself or its parent
        s = data.load_dataset("cifar10", root=root, seed=0, val_fraction=0.2)
        assert len(s.test) == 10 and len(s.train) + len(s.val) == 60
        assert s.num_classes == 10 and s.in_chans == 3 and s.img_size == 32 and s.classes[0] == "airplane"
    x, y = s.test.batch(torch.arange(3))
    assert x.shape == (3, 3, 32, 32)


def test_missing_and_malformed_paths_raise_data_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataError, match=f"'{missing}' does not exist.*cifar-10-batches-py"):
        data.load_dataset("cifar10", root=missing)
    with pytest.raises(data.DataError, match=f"'{missing}' does not exist.*sub-folder per class"):
        data.load_dataset("imagefolder", root=missing)

    folder = make_cifar_folder(tmp_path / "c")
    (folder / "data_batch_3").unlink()
    with pytest.raises(data.DataError, match="lacks data_batch_3"):
        data.load_dataset("cifar10", root=folder)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="data_batch_3' could not be unpickled.*b'data'"):
        data.load_dataset("cifar10", root=folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(data.DataError, match=r"shape \(2, 100\)"):
        data.load_dataset("cifar10", root=folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(data.DataError, match="CIFAR-100"):
        data.load_dataset("cifar10", root=folder)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match=f"'{empty}' is not an image folder"):
        data.load_dataset("imagefolder", root=empty)
    broken = make_image_folder(tmp_path / "broken", per_class=3)
    (broken / "cat" / "0.png").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="0.png' is not a readable image"):
        data.load_dataset("imagefolder", root=broken)


def test_bad_names_options_and_roots():
    with pytest.raises(data.DataError, match="did you mean 'digits'"):
        data.load_dataset("digit")
    with pytest.raises(data.DataError, match="unknown option 'img_sise'.*did you mean 'img_size'"):
        data.load_dataset("digits", img_sise=8)
    with pytest.raises(data.DataError, match="embedded and takes no root"):
        data.load_dataset("digits", root="/tmp")
    with pytest.raises(data.DataError, match="pass root"):
        data.load_dataset("cifar10")
    with pytest.raises(data.DataError, match="val_fraction"):
        data.load_dataset("digits", val_fraction=0.6, test_fraction=0.5)


def test_an_empty_split_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "few", per_class=2)
    with pytest.raises(data.DataError, match="validation split is empty"):
        data.load_dataset("imagefolder", root=root, val_fraction=0.1, test_fraction=0.5)


def test_marks_labels_say_whether_the_two_distant_glyphs_match():
    images, labels, corners = data.generate_marks(num_samples=300, size=16, seed=0, num_glyphs=3, noise=0.0)
    assert 0.4 < labels.mean() < 0.6
    for image, label, (a, b) in zip(images, labels, corners):
        first, second = image[a[0]:a[0] + 3, a[1]:a[1] + 3], image[b[0]:b[0] + 3, b[1]:b[1] + 3]
        assert np.hypot(*(a - b)) >= 8.0
        assert np.array_equal(first, second) == bool(label)
    again = data.generate_marks(num_samples=300, size=16, seed=0, num_glyphs=3, noise=0.0)
    assert np.array_equal(images, again[0]) and np.array_equal(labels, again[1])
    with pytest.raises(data.DataError, match="no room"):
        data.load_dataset("marks", size=6, min_distance=20.0)
