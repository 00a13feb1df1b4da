"""Dataset loaders on generated files, augmentation, partitions and node data."""

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flwr_gkt.data import (
    DATASETS,
    DEFAULT_FASHION_MNIST_DIR,
    DatasetMissingError,
    RandomCropFlip,
    clear_caches,
    client_data,
    load_dataset,
    normalize,
)
from flwr_gkt.data.partition import label_counts, label_matched_split, partition_indices
from tests.helpers.cifar_files import write_cifar as _write_cifar


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_GKT_CACHE", str(tmp_path / "cache"))
    clear_caches()
    yield tmp_path / "cache"
    clear_caches()


# ------------------------------------------------------------- Fashion-MNIST
def _idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 0x0803, *images.shape) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes()


def _write_fmnist(directory, compress, n_train=12, n_test=6, prefix=""):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_train, 28, 28))
    arrays = {
        "train-images-idx3-ubyte": _idx_images(images),
        "train-labels-idx1-ubyte": _idx_labels(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte": _idx_images(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte": _idx_labels(np.arange(n_test) % 10),
    }
    target = directory / prefix
    target.mkdir(parents=True, exist_ok=True)
    for name, blob in arrays.items():
        if compress:
            with gzip.open(target / f"{name}.gz", "wb") as f:
                f.write(blob)
        else:
            (target / name).write_bytes(blob)
    return images


@pytest.mark.parametrize("compress,prefix", [(True, ""), (False, ""), (False, "FashionMNIST/raw")])
def test_loads_generated_idx_files_in_every_layout(tmp_path, cache, compress, prefix):
    images = _write_fmnist(tmp_path / "ds", compress, prefix=prefix)
    raw = load_dataset("fashion-mnist", str(tmp_path / "ds"))
    assert raw.x_train.shape == (12, 1, 28, 28) and raw.x_test.shape == (6, 1, 28, 28)
    assert raw.x_train.dtype == torch.uint8 and raw.y_train.dtype == torch.int64
    assert np.array_equal(raw.x_train[:, 0].numpy(), images)
    assert raw.y_train.tolist() == [i % 10 for i in range(12)]
    x = normalize(raw.x_train, raw.info)
    assert x.dtype == torch.float32
    assert torch.allclose(x[0, 0, 0, 0], (raw.x_train[0, 0, 0, 0] / 255.0 - 0.2860) / 0.3530)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path, cache):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path / "empty"))


@pytest.mark.skipif(
    not Path(DEFAULT_FASHION_MNIST_DIR).is_dir(), reason="needs dataset-fashion-mnist"
)
def test_real_fashion_mnist_partitions_cover_the_test_set():
    parts = [client_data(i, 4, fraction=0.01, test_fraction=1.0) for i in range(4)]
    assert sum(len(p.y_test) for p in parts) == 10_000
    assert sum(len(p.y_train) for p in parts) == 600
    assert parts[0].x_train.shape[1:] == (1, 28, 28) and parts[0].num_classes == 10
    assert parts[0].augment is None  # no augmentation for Fashion-MNIST
    all_test = torch.cat([p.x_test for p in parts])
    assert abs(float(all_test.mean())) < 0.05 and abs(float(all_test.std()) - 1) < 0.05


# ------------------------------------------------------------------ CIFAR
@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_loader_reads_torchvision_format(tmp_path, cache, kind):
    written = _write_cifar(tmp_path / "data", kind)
    raw = load_dataset(kind, str(tmp_path / "data"))
    train_files = [n for n in written if n not in ("test_batch", "test")]
    assert raw.x_train.shape == (6 * len(train_files), 3, 32, 32) and raw.x_test.shape == (
        6,
        3,
        32,
        32,
    )
    first_data, first_labels = written[train_files[0]]
    # torchvision's layout: 3072 bytes = 3 planes of 32x32 (R, G, B)
    assert np.array_equal(raw.x_train[0].numpy(), first_data[0].reshape(3, 32, 32))
    assert raw.y_train[:6].tolist() == first_labels.tolist()
    assert raw.info.num_classes == (10 if kind == "cifar10" else 100)
    # data-dir may also name the extracted folder itself
    folder = next((tmp_path / "data").iterdir())
    clear_caches()
    assert torch.equal(load_dataset(kind, str(folder)).x_test, raw.x_test)


@pytest.mark.parametrize("filters", [True, False], ids=["tarfile-filters", "python-before-3.11.4"])
def test_cifar_archive_is_extracted_on_first_use(tmp_path, cache, monkeypatch, filters):
    if not filters:  # Debian 12's Python 3.11.2 has no tarfile.data_filter
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    _write_cifar(tmp_path / "src", "cifar10")
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    raw = load_dataset("cifar10", str(tmp_path / "data"))
    assert len(raw.y_train) == 30 and (tmp_path / "data" / "cifar-10-batches-py").is_dir()


@pytest.mark.parametrize("filters", [True, False], ids=["tarfile-filters", "python-before-3.11.4"])
def test_a_cifar_archive_holding_a_link_is_refused(tmp_path, cache, monkeypatch, filters):
    """(A ``../`` member: ``tests/wire/test_trust.py::test_archives_cannot_write_outside_the_data_dir``.)"""
    if not filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "cifar-10-python.tar.gz", "w:gz") as tar:
        member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(member, io.BytesIO(b""))
    with pytest.raises(tarfile.TarError):
        load_dataset("cifar10", str(tmp_path / "data"))
    assert not (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1").exists()


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("cinic10", "train/<class>"),
    ],
)
def test_missing_dataset_says_where_and_how(tmp_path, cache, kind, expected):
    with pytest.raises(DatasetMissingError) as err:
        load_dataset(kind, str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(err.value) and expected in str(err.value)
    assert "data-dir" in str(err.value)


# ------------------------------------------------------------------ CINIC-10
def test_cinic10_loader_reads_image_folders_and_caches(tmp_path, cache):
    rng = np.random.default_rng(0)
    classes = ["airplane", "automobile", "bird"]
    expected = {}
    for split, per_class in (("train", 3), ("valid", 1), ("test", 2)):
        for c, name in enumerate(classes):
            d = tmp_path / "cinic" / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                gray = split == "train" and c == 2 and i == 0  # CINIC has some grayscale images
                pixels = rng.integers(0, 256, (32, 32) if gray else (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"img{i}.png")
                img = torch.from_numpy(pixels)
                expected[(split, name, i)] = img.expand(3, 32, 32) if gray else img.permute(2, 0, 1)
    raw = load_dataset("cinic10", str(tmp_path / "cinic"))
    assert raw.x_train.shape == (9, 3, 32, 32) and raw.x_test.shape == (6, 3, 32, 32)
    assert raw.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # ImageFolder order
    assert torch.equal(raw.x_train[0], expected[("train", "airplane", 0)])
    assert torch.equal(raw.x_train[6], expected[("train", "bird", 0)])  # grayscale -> RGB
    assert torch.equal(raw.x_test[5], expected[("test", "bird", 1)])
    assert len(list((cache / "imagefolder").glob("*.npz"))) == 2
    clear_caches()
    again = load_dataset("cinic10", str(tmp_path / "cinic"))  # from the cache
    assert torch.equal(again.x_train, raw.x_train) and torch.equal(again.y_test, raw.y_test)


# ------------------------------------------------------------- augmentation
def test_random_crop_flip_matches_padded_crops_per_sample():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    aug = RandomCropFlip(padding=2, fill=(-1.0, -2.0, -3.0))
    out = aug(x, gen)
    assert out.shape == x.shape
    padded = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1).repeat(32, 1, 12, 12)
    padded[:, :, 2:10, 2:10] = x
    seen_offsets, flips = set(), 0
    for i in range(32):
        matches = [
            (dy, dx, f)
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
            if torch.equal(
                out[i], (lambda w: w.flip(2) if f else w)(padded[i, :, dy : dy + 8, dx : dx + 8])
            )
        ]
        assert matches, f"sample {i} is not a (flipped) crop of its padded image"
        seen_offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(seen_offsets) > 5 and 4 < flips < 28  # per-sample parameters, not one per batch
    again = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # reproducible by generator


def test_augmentation_pads_with_black_in_normalised_units():
    info = DATASETS["cifar10"]
    aug = RandomCropFlip.for_dataset(info)
    black = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), info).flatten()
    assert torch.allclose(torch.tensor(aug.fill), black)


# ---------------------------------------------------------------- partitions
def _labels(n=4000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def test_iid_partition_is_disjoint_reproducible_and_sized():
    y = _labels(1000)
    parts = partition_indices(y, 4, "iid", seed=3, fraction=0.5)
    assert [len(p) for p in parts] == [125] * 4
    assert len(np.unique(np.concatenate(parts))) == 500
    again = partition_indices(y, 4, "iid", seed=3, fraction=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(y, 4, "iid", seed=4, fraction=0.5)
    assert not np.array_equal(parts[0], other[0])
    with pytest.raises(ValueError):
        partition_indices(y, 2, "iid", seed=0, fraction=0.0)
    with pytest.raises(ValueError, match="unknown partition"):
        partition_indices(y, 2, "shards")


def _skew(y, parts, classes=10):
    """Mean over nodes of the total-variation distance to the global label mix."""
    glob = label_counts(y, classes) / len(y)
    return float(
        np.mean([0.5 * np.abs(label_counts(y[p], classes) / len(p) - glob).sum() for p in parts])
    )


def test_dirichlet_partition_skews_labels_reproducibly():
    y = _labels()
    parts = partition_indices(y, 8, "dirichlet", seed=1, alpha=0.5, min_partition_size=20)
    flat = np.concatenate(parts)
    assert len(flat) == len(y) == len(np.unique(flat))  # disjoint, complete
    assert min(len(p) for p in parts) >= 20
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            parts,
            partition_indices(y, 8, "dirichlet", seed=1, alpha=0.5, min_partition_size=20),
            strict=False,
        )
    )
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(
            parts,
            partition_indices(y, 8, "dirichlet", seed=2, alpha=0.5, min_partition_size=20),
            strict=False,
        )
    )
    iid = _skew(y, partition_indices(y, 8, "iid", seed=1))
    skew_05 = _skew(y, parts)
    skew_01 = _skew(
        y, partition_indices(y, 8, "dirichlet", seed=1, alpha=0.1, min_partition_size=20)
    )
    skew_100 = _skew(
        y, partition_indices(y, 8, "dirichlet", seed=1, alpha=100.0, min_partition_size=20)
    )
    assert iid < 0.1 and skew_100 < 0.1
    assert skew_01 > skew_05 > 0.25 > iid
    # some node misses a class entirely at alpha 0.1
    assert any(
        (label_counts(y[p], 10) == 0).any()
        for p in partition_indices(y, 8, "dirichlet", seed=1, alpha=0.1, min_partition_size=20)
    )
    with pytest.raises(ValueError, match="min-partition-size"):
        partition_indices(y[:50], 8, "dirichlet", min_partition_size=10)


def test_label_matched_split_follows_the_reference_mix():
    pool = _labels(5000, seed=5)
    ref = np.array([0] * 60 + [3] * 30 + [7] * 10)
    idx = label_matched_split(pool, ref, 200, 10, seed=0)
    assert len(idx) == 200 == len(np.unique(idx))
    assert label_counts(pool[idx], 10).tolist() == [120, 0, 0, 60, 0, 0, 0, 20, 0, 0]


def test_client_data_partitions_generated_cifar(tmp_path, cache):
    _write_cifar(tmp_path / "data", "cifar10", n_per_file=40)
    kwargs = dict(
        dataset="cifar10",
        data_dir=str(tmp_path / "data"),
        partition="dirichlet",
        dirichlet_alpha=0.5,
        min_partition_size=5,
        seed=3,
    )
    nodes = [client_data(i, 4, **kwargs) for i in range(4)]
    assert sum(len(n.y_train) for n in nodes) == 200 and sum(len(n.y_test) for n in nodes) == 40
    assert all(
        n.x_train.dtype == torch.float32 and n.x_train.shape[1:] == (3, 32, 32) for n in nodes
    )
    assert all(isinstance(n.augment, RandomCropFlip) for n in nodes)
    again = client_data(2, 4, **kwargs)
    assert torch.equal(again.x_train, nodes[2].x_train) and torch.equal(
        again.y_test, nodes[2].y_test
    )
    local = client_data(2, 4, **{**kwargs, "test_split": "local"}, augment=False)
    assert local.augment is None
    train_mix = label_counts(local.y_train.numpy(), 10) / len(local.y_train)
    test_mix = label_counts(local.y_test.numpy(), 10) / len(local.y_test)
    assert set(np.nonzero(test_mix)[0]) <= set(np.nonzero(train_mix)[0])
