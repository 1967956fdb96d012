"""Tests for paper_repro/data/: readers of the real on-disk formats, and the ArrayLoader's
determinism and augmentation. Every file is written under tmp_path."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from paper_repro import data
from paper_repro.data import ArrayLoader, Augment, Batch
from paper_repro.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    """Tests see no $REPRO_DATA unless they set it."""
    monkeypatch.delenv("REPRO_DATA", raising=False)


# ------------------------------------------------------------------------------------------------
# Writers of tiny real-format files


def _cifar_rows(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are protocol 2 (Python 2) pickles


def _write_cifar10(folder, per_batch=3, test=4, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    batches = {}
    for i in range(1, 6):
        rows = _cifar_rows(rng, per_batch)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batches[f"data_batch_{i}"] = (rows, labels)
    batches["test_batch"] = (_cifar_rows(rng, test), [int(v) for v in rng.integers(0, 10, test)])
    for name, (rows, labels) in batches.items():
        _write_pickle(os.path.join(folder, name), {
            b"batch_label": name.encode(), b"labels": labels, b"data": rows,
            b"filenames": [b"x.png"] * len(labels),
        })
    return batches


def _write_idx(path, array, magic, compress=True, truncate=0):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    raw = raw[:len(raw) - truncate] if truncate else raw
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(raw)


def _write_fashion(folder, split="train", n=6, labels=None, compress=True, truncate_images=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n) if labels is None else np.asarray(labels)
    ext = ".gz" if compress else ""
    _write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{ext}"), images, 2051, compress,
               truncate_images)
    _write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{ext}"), labels, 2049, compress)
    return images, labels


# ------------------------------------------------------------------------------------------------
# Registry


def test_unknown_dataset_name_lists_valid_names():
    with pytest.raises(ConfigError, match="cifar10, cifar100, fashion-mnist, imagenet"):
        data.dataset_info("mnist")
    with pytest.raises(ConfigError):
        data.load_arrays("svhn", None, train=True)


def test_registry_entries_are_consistent():
    assert data.list_datasets() == ["cifar10", "cifar100", "fashion-mnist", "imagenet"]
    for name in data.list_datasets():
        info = data.dataset_info(name)
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.channels
        assert info.in_memory == (name != "imagenet")
        if info.class_names:
            assert len(info.class_names) == info.num_classes
    assert len(set(data.dataset_info("cifar100").class_names)) == 100


def test_imagenet_is_not_an_array_dataset(tmp_path):
    with pytest.raises(ConfigError, match="make_imagenet_loader"):
        data.load_arrays("imagenet", str(tmp_path), train=True)


# ------------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_pickles_load_in_chw_order(tmp_path):
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py")
    x, y = data.load_arrays("cifar10", str(tmp_path), train=True)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.dtype == torch.int64
    assert y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # Row layout is 1024 R, then G, then B, each row-major: pixel (c=1, h=5, w=7) of image 4
    # (second image of data_batch_2) sits at column 1024 + 5 * 32 + 7.
    rows = batches["data_batch_2"][0]
    assert int(x[4, 1, 5, 7]) == int(rows[1, 1024 + 5 * 32 + 7])
    assert torch.equal(x[3], torch.from_numpy(rows[0]).view(3, 32, 32))

    xt, yt = data.load_arrays("cifar10", str(tmp_path), train=False)
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == batches["test_batch"][1]


def test_cifar10_root_may_be_the_batches_folder_or_repro_data(tmp_path, monkeypatch):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    x, _ = data.load_arrays("cifar10", str(tmp_path / "cifar-10-batches-py"), train=False)
    assert x.shape[0] == 4
    monkeypatch.setenv("REPRO_DATA", str(tmp_path))
    x, _ = data.load_arrays("cifar10", None, train=False)
    assert x.shape[0] == 4


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    rows = _cifar_rows(rng, 5)
    fine = [0, 99, 42, 7, 63]
    for name in ("train", "test"):
        _write_pickle(folder / name, {b"data": rows, b"fine_labels": fine, b"coarse_labels": [1] * 5})
    x, y = data.load_arrays("cifar100", str(tmp_path), train=True)
    assert x.shape == (5, 3, 32, 32) and y.tolist() == fine
    assert int(x[2, 2, 31, 0]) == int(rows[2, 2048 + 31 * 32])


def test_cifar_missing_says_how_to_get_torchvision_format(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_arrays("cifar10", str(tmp_path), train=True)
    msg = str(err.value)
    assert "\n" not in msg and "torchvision" in msg and "CIFAR10(" in msg and str(tmp_path) in msg


def test_cifar_wrong_format_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    _write_pickle(folder / "data_batch_3", {b"images": 1})  # a dict without the keys
    with pytest.raises(DataError, match="data_batch_3"):
        data.load_arrays("cifar10", str(tmp_path), train=True)
    (folder / "test_batch").write_bytes(b"\x00garbage, not a pickle at all")
    with pytest.raises(DataError, match="test_batch") as err:
        data.load_arrays("cifar10", str(tmp_path), train=False)
    assert "\n" not in str(err.value)


def test_cifar_labels_out_of_range(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    rows = _cifar_rows(np.random.default_rng(0), 2)
    _write_pickle(folder / "test_batch", {b"data": rows, b"labels": [3, 10]})
    with pytest.raises(DataError, match="labels"):
        data.load_arrays("cifar10", str(tmp_path), train=False)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_fashion_mnist_idx_gz_loads_from_root(tmp_path):
    images, labels = _write_fashion(tmp_path, "t10k")
    x, y = data.load_arrays("fashion-mnist", str(tmp_path), train=False)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], torch.from_numpy(images))
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()


def test_fashion_mnist_uncompressed_in_torchvision_raw_folder(tmp_path):
    images, _ = _write_fashion(tmp_path / "FashionMNIST" / "raw", "train", compress=False)
    x, _ = data.load_arrays("fashion-mnist", str(tmp_path), train=True)
    assert torch.equal(x[:, 0], torch.from_numpy(images))


def test_fashion_mnist_truncated_idx_names_the_file(tmp_path):
    _write_fashion(tmp_path, "train", compress=False, truncate_images=10)
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
        data.load_arrays("fashion-mnist", str(tmp_path), train=True)
    assert "truncated" in str(err.value)


def test_fashion_mnist_truncated_gzip_stream_names_the_file(tmp_path):
    _write_fashion(tmp_path, "train")
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        data.load_arrays("fashion-mnist", str(tmp_path), train=True)


def test_fashion_mnist_wrong_magic(tmp_path):
    _write_fashion(tmp_path, "train")
    # swap images and labels magic: an images file that claims to be a labels file
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(6, np.uint8), 2049)
    with pytest.raises(DataError, match="magic number 2051"):
        data.load_arrays("fashion-mnist", str(tmp_path), train=True)


def test_fashion_mnist_labels_out_of_range(tmp_path):
    _write_fashion(tmp_path, "train", labels=[0, 1, 2, 3, 4, 11])
    with pytest.raises(DataError, match=r"labels .*\[0, 10\)"):
        data.load_arrays("fashion-mnist", str(tmp_path), train=True)


def test_fashion_mnist_count_mismatch(tmp_path):
    _write_fashion(tmp_path, "train")
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8), 2049)
    with pytest.raises(DataError, match="6 images but 5 labels"):
        data.load_arrays("fashion-mnist", str(tmp_path), train=True)


def test_fashion_mnist_missing_everywhere_lists_searched_paths(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    nowhere = str(tmp_path / "no-debian-package")
    monkeypatch.setattr(data.idx, "FASHION_MNIST_DEBIAN_DIR", nowhere)
    with pytest.raises(DataError) as err:
        data.load_arrays("fashion-mnist", str(empty), train=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(empty) in msg and nowhere in msg and "dataset-fashion-mnist" in msg


def test_fashion_mnist_found_via_repro_data(tmp_path, monkeypatch):
    _write_fashion(tmp_path / "shared", "train")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(data.idx, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("REPRO_DATA", str(tmp_path / "shared"))
    x, _ = data.load_arrays("fashion-mnist", str(tmp_path / "empty"), train=True)
    assert x.shape == (6, 1, 28, 28)


@pytest.mark.skipif(not os.path.isdir(data.idx.FASHION_MNIST_DEBIAN_DIR),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_test_split_from_debian_package(tmp_path):
    x, y = data.load_arrays("fashion-mnist", str(tmp_path), train=False)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10000,) and sorted(y.unique().tolist()) == list(range(10))
    assert torch.bincount(y).tolist() == [1000] * 10


# ------------------------------------------------------------------------------------------------
# ti500k


def test_ti500k_hwc_pickle(tmp_path):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    targets = [int(v) for v in rng.integers(0, 10, 7)]
    path = tmp_path / "ti_500K_pseudo_labeled.pickle"
    with open(path, "wb") as f:
        pickle.dump({"data": hwc, "extrapolated_targets": targets}, f)
    x, y = data.load_ti500k(str(path))
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert int(x[3, 2, 10, 20]) == int(hwc[3, 10, 20, 2])
    assert y.dtype == torch.int64 and y.tolist() == targets


def test_ti500k_chw_accepted_and_bad_shape_rejected(tmp_path):
    chw = np.zeros((2, 3, 32, 32), np.uint8)
    path = tmp_path / "chw.pickle"
    with open(path, "wb") as f:
        pickle.dump({"data": chw, "extrapolated_targets": [1, 2]}, f)
    assert data.load_ti500k(str(path))[0].shape == (2, 3, 32, 32)
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 28, 28), np.uint8), "extrapolated_targets": [1, 2]}, f)
    with pytest.raises(DataError, match="chw.pickle"):
        data.load_ti500k(str(path))
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(DataError, match="extrapolated_targets"):
        data.load_ti500k(str(path))
    with pytest.raises(DataError, match="no file"):
        data.load_ti500k(str(tmp_path / "absent.pickle"))


# ------------------------------------------------------------------------------------------------
# ImageNet


def _write_image_folder(root, classes=("n01", "n02"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = (int(rng.integers(40, 80)), int(rng.integers(40, 80)))
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", format="JPEG")


@pytest.mark.parametrize("train", [True, False])
def test_imagenet_loader_yields_batches_of_224(tmp_path, train):
    _write_image_folder(tmp_path)
    loader = data.make_imagenet_loader(str(tmp_path), train, batch_size=4, workers=0)
    assert len(loader) == 2
    loader.set_epoch(0)
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert [tuple(b.x.shape) for b in batches] == [(4, 3, 224, 224), (2, 3, 224, 224)]
    x = torch.cat([b.x for b in batches])
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    index = torch.cat([b.index for b in batches])
    labels = torch.cat([b.y for b in batches])
    assert sorted(index.tolist()) == list(range(6))
    assert labels[index.argsort()].tolist() == [0, 0, 0, 1, 1, 1]


def test_imagenet_missing_folder(tmp_path):
    with pytest.raises(DataError, match="val"):
        data.make_imagenet_loader(str(tmp_path), False, batch_size=4, workers=0)


# ------------------------------------------------------------------------------------------------
# ArrayLoader


def _arrays(n=10, c=3, size=8):
    images = torch.arange(n * c * size * size, dtype=torch.int64).remainder(251).to(torch.uint8)
    return images.view(n, c, size, size), torch.arange(n) % 4


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_every_sample_once_per_epoch_when_shuffled():
    images, labels = _arrays(n=10)
    loader = ArrayLoader(images, labels, batch_size=3, shuffle=True, seed=5)
    assert len(loader) == 4 and loader.num_samples == 10
    batches = _epoch(loader, 0)
    index = torch.cat([b.index for b in batches])
    assert sorted(index.tolist()) == list(range(10))
    assert index.tolist() != list(range(10))
    for b in batches:
        assert b.x.dtype == torch.float32 and b.y.dtype == torch.int64 and b.index.dtype == torch.int64
        assert torch.equal(b.x, images[b.index].float() / 255)  # no augmentation by default
        assert torch.equal(b.y, labels[b.index])


def test_unshuffled_order_is_sequential():
    images, labels = _arrays(n=7)
    batches = _epoch(ArrayLoader(images, labels, batch_size=3, shuffle=False), 0)
    assert [b.index.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]


def test_drop_last():
    images, labels = _arrays(n=10)
    loader = ArrayLoader(images, labels, batch_size=3, shuffle=True, drop_last=True)
    batches = _epoch(loader, 0)
    assert len(loader) == 3 and [len(b.y) for b in batches] == [3, 3, 3]


def test_epoch_is_a_pure_function_of_seed_and_epoch():
    images, labels = _arrays(n=20)
    aug = Augment(pad=2, flip=True)
    loader = ArrayLoader(images, labels, batch_size=6, shuffle=True, augment=aug, seed=3)
    first, again = _epoch(loader, 4), _epoch(loader, 4)
    other = _epoch(loader, 5)
    fresh = _epoch(ArrayLoader(images, labels, batch_size=6, shuffle=True, augment=aug, seed=3), 4)
    for a, b, c in zip(first, again, fresh):
        assert torch.equal(a.x, b.x) and torch.equal(a.index, b.index) and torch.equal(a.x, c.x)
    assert not all(torch.equal(a.index, b.index) for a, b in zip(first, other))
    # Without set_epoch, each iteration moves on to the next epoch.
    loader.set_epoch(4)
    list(loader)
    assert all(torch.equal(a.x, b.x) for a, b in zip(other, loader))


def _windows(padded, size):
    """All size x size windows of padded [C, H+2p, W+2p]."""
    span = padded.shape[-1] - size + 1
    return [padded[:, t:t + size, l:l + size] for t in range(span) for l in range(span)]


@pytest.mark.parametrize("mode,value", [("zeros", 0.0), ("reflect", 0.0), ("constant", 0.5)])
def test_crop_is_a_window_of_the_padded_image(mode, value):
    images, labels = _arrays(n=12, size=8)
    aug = Augment(pad=4, pad_mode=mode, pad_value=value)
    loader = ArrayLoader(images, labels, batch_size=5, shuffle=True, augment=aug, seed=1)
    offsets_seen = set()
    for b in _epoch(loader, 0):
        assert b.x.shape[1:] == (3, 8, 8) and b.x.dtype == torch.float32
        assert b.x.min() >= 0 and b.x.max() <= 1
        for x, i in zip(b.x, b.index):
            ref = images[i].float() / 255
            torch_mode = "constant" if mode != "reflect" else "reflect"
            padded = F.pad(ref[None], (4, 4, 4, 4), mode=torch_mode,
                           **({"value": value} if torch_mode == "constant" else {}))[0]
            hits = [k for k, w in enumerate(_windows(padded, 8)) if torch.equal(w, x)]
            assert hits, "output is not a window of the padded image"
            offsets_seen.add(hits[0])
    assert len(offsets_seen) > 3  # offsets actually vary


def test_crop_matches_slow_reference_at_recovered_offsets():
    """Each output equals F.pad then a slice, for the offsets the loader drew."""
    images, labels = _arrays(n=9, size=6)
    aug = Augment(pad=4)
    loader = ArrayLoader(images, labels, batch_size=4, shuffle=False, augment=aug, seed=2)
    gen = torch.Generator().manual_seed(data.loader.epoch_seed(2, 0))
    offsets = torch.randint(0, 9, (9, 2), generator=gen)  # the loader's draw order without shuffle
    for b in _epoch(loader, 0):
        for x, i in zip(b.x, b.index):
            top, left = offsets[i].tolist()
            padded = F.pad(images[i].float() / 255, (4, 4, 4, 4))
            assert torch.equal(x, padded[:, top:top + 6, left:left + 6])


def test_flip_mirrors_some_examples_and_keeps_the_rest():
    images, labels = _arrays(n=40)
    loader = ArrayLoader(images, labels, batch_size=16, shuffle=True, augment=Augment(flip=True))
    flipped = 0
    for b in _epoch(loader, 0):
        for x, i in zip(b.x, b.index):
            ref = images[i].float() / 255
            if torch.equal(x, ref.flip(-1)):
                flipped += 1
            else:
                assert torch.equal(x, ref)
    assert 5 < flipped < 35


def test_bad_augment_and_arrays_are_rejected():
    with pytest.raises(ConfigError, match="pad_mode"):
        Augment(pad=4, pad_mode="edge")
    with pytest.raises(ConfigError):
        Augment(pad_value=2.0)
    images, labels = _arrays(n=4)
    with pytest.raises(DataError):
        ArrayLoader(images.float(), labels, batch_size=2, shuffle=False)
    with pytest.raises(DataError):
        ArrayLoader(images, labels[:3], batch_size=2, shuffle=False)
    with pytest.raises(ConfigError):
        ArrayLoader(images, labels, batch_size=0, shuffle=False)


def test_split_sizes_are_typed_once_on_the_registry():
    """Train/test image counts live on DatasetInfo (issue 24): plan, bench, gpucheck and export
    read them there, and none of them types a count again."""
    import inspect

    from paper_repro import export, model_card
    from paper_repro.perf import bench, harness
    from paper_repro.perf import gpucheck
    from paper_repro.perf import plan
    from paper_repro.config import build_config
    from paper_repro.data.registry import EXTRA_DATA

    sizes = {n: (data.dataset_info(n).train_size, data.dataset_info(n).test_size)
             for n in data.list_datasets()}
    assert sizes == {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000),
                     "fashion-mnist": (60_000, 10_000), "imagenet": (1_281_167, 50_000)}
    assert EXTRA_DATA["ti500k"].train_size == 500_000
    for name in data.list_datasets():  # plan's training images per epoch derive from them
        assert plan.train_images(build_config(("t", {"dataset": name}))) == sizes[name][0]
    with_ti500k = build_config(("t", {"dataset": "cifar10", "extra_data": "ti500k", "val_n": 10}))
    assert plan.train_images(with_ti500k) == 50_000 - 10 + 500_000
    assert gpucheck.GPU.epoch_images == 50_000
    for module in (bench, harness, export, model_card, gpucheck, plan):
        source = inspect.getsource(module)
        for count in ("1_281_167", "500_000", "60_000", "50_000", "10_000"):
            assert count not in source, (module.__name__, count)
