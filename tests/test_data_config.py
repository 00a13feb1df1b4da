"""Dataset loading (Debian layout, plain IDX, torchvision layout), partitions, config."""

import gzip
import struct

import numpy as np
import pytest
import torch

from flwr_gkt import data as data_mod
from flwr_gkt.config import RunConfig, load_preset, parse_overrides, resolve_config
from flwr_gkt.data import DatasetMissingError, client_data, iid_partition, load_fashion_mnist

from simulation.task import PRESETS_DIR


def _idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 0x0803, *images.shape) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes()


def _write_fmnist(directory, compress, n_train=12, n_test=6, prefix=""):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": _idx_images(rng.integers(0, 256, (n_train, 28, 28))),
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


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_GKT_CACHE", str(tmp_path / "cache"))
    load_fashion_mnist.cache_clear()
    yield
    load_fashion_mnist.cache_clear()


@pytest.mark.parametrize("compress,prefix", [(True, ""), (False, ""), (False, "FashionMNIST/raw")])
def test_loads_generated_idx_files_in_every_layout(tmp_path, cache, compress, prefix):
    _write_fmnist(tmp_path / "ds", compress, prefix=prefix)
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(str(tmp_path / "ds"))
    assert x_tr.shape == (12, 1, 28, 28) and x_te.shape == (6, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert y_tr.tolist() == [i % 10 for i in range(12)]
    assert -1.0 < float(x_tr.min()) < 0 < float(x_tr.max()) < 3.0  # normalised


def test_missing_dataset_names_the_debian_package(tmp_path, cache):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "empty"))


def test_iid_partition_is_disjoint_reproducible_and_sized():
    parts = iid_partition(1000, 4, seed=3, fraction=0.5)
    assert [len(p) for p in parts] == [125] * 4
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == 500
    again = iid_partition(1000, 4, seed=3, fraction=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = iid_partition(1000, 4, seed=4, fraction=0.5)
    assert not np.array_equal(parts[0], other[0])
    with pytest.raises(ValueError):
        iid_partition(10, 2, seed=0, fraction=0.0)


@pytest.mark.skipif(not (data_mod.Path(data_mod.DEFAULT_FASHION_MNIST_DIR)).is_dir(),
                    reason="needs the dataset-fashion-mnist package")
def test_real_fashion_mnist_partitions_cover_the_test_set():
    load_fashion_mnist.cache_clear()
    parts = [client_data(i, 4, fraction=0.01, test_fraction=1.0) for i in range(4)]
    assert sum(len(p.y_test) for p in parts) == 10_000
    assert sum(len(p.y_train) for p in parts) == 600
    assert parts[0].x_train.shape[1:] == (1, 28, 28) and parts[0].num_classes == 10


def test_config_precedence_and_types(tmp_path):
    cfg = resolve_config({"preset": "smoke"}, PRESETS_DIR)
    assert cfg.num_server_rounds == 2 and cfg.server_model == "resnet10"
    cfg = resolve_config({"preset": "smoke", "num-server-rounds": 7, "server-model": "",
                          "alpha": "0.5"}, PRESETS_DIR)
    assert cfg.num_server_rounds == 7 and cfg.server_model == "resnet10" and cfg.alpha == 0.5
    assert resolve_config({}, PRESETS_DIR) == RunConfig()
    with pytest.raises(KeyError, match="unknown config key"):
        resolve_config({"num-rounds": 3}, PRESETS_DIR)
    with pytest.raises(FileNotFoundError, match="available"):
        resolve_config({"preset": "nope"}, PRESETS_DIR)
    with pytest.raises(ValueError):
        RunConfig().with_values({"num-server-rounds": 2.5})
    own = tmp_path / "mine.yaml"
    own.write_text("server-epochs: 3\nkd-mode: none\n")
    cfg = resolve_config({"preset": str(own)})
    assert cfg.server_epochs == 3 and cfg.kd_mode == "none"
    assert parse_overrides(["a=1 b=x", "c=0.5", "d="]) == {"a": 1, "b": "x", "c": 0.5, "d": ""}


def test_every_preset_and_pyproject_key_is_a_config_key():
    import tomllib

    keys = set(RunConfig.keys())
    for preset in PRESETS_DIR.glob("*.yaml"):
        assert set(load_preset(str(preset))) <= keys, preset.name
    with open(PRESETS_DIR.parent.parent / "pyproject.toml", "rb") as f:
        app_config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert set(app_config) - {"preset"} <= keys
