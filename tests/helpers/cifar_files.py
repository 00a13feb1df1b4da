"""Dataset files as the loaders find them on disk."""

import pickle
from pathlib import Path

import numpy as np


def write_cifar(root: Path, kind: str, n_per_file: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """torchvision's pickled CIFAR layout with random images; returns what was written."""
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        key, meta, meta_key, ncls = "labels", "batches.meta", "label_names", 10
    else:
        folder = root / "cifar-100-python"
        files = ["train", "test"]
        key, meta, meta_key, ncls = "fine_labels", "meta", "fine_label_names", 100
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in files:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, ncls, n_per_file)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: labels.tolist()}, f)
        written[name] = (data, labels)
    with open(folder / meta, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(ncls)]}, f)
    return written
