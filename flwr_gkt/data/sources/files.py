"""What the dataset loaders share: their cache directory and the missing-files error."""

from __future__ import annotations

import os
from pathlib import Path


class DatasetMissingError(FileNotFoundError):
    """The dataset files are not where they are expected."""


def cache_dir() -> Path:
    """Return the cache directory, ``$FLWR_GKT_CACHE`` (default ``~/.cache/flwr_gkt``).

    Returns
    -------
    Path
        Where unpacked and decoded dataset files are kept.
    """
    return Path(os.environ.get("FLWR_GKT_CACHE", Path.home() / ".cache" / "flwr_gkt"))
