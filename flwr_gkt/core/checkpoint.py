"""Crash-safe checkpoint files and RNG state.

:func:`save_checkpoint` serializes a state dict (tensors, numbers, strings and
containers of them) with :func:`torch.save`, prefixes it with a header holding
the SHA-256 of the serialized bytes, writes it to a temporary file in the same
directory, ``fsync``-s it and renames it over the previous checkpoint
(``os.replace`` is atomic on POSIX), then ``fsync``-s the directory. A crash at
any point leaves either the previous checkpoint or the new one, never a mix;
:func:`load_checkpoint` refuses a file whose checksum does not match (disk
corruption, a file truncated by hand) with :class:`CheckpointError` instead of
loading wrong state. Loading uses ``torch.load(weights_only=True)``: a
checkpoint cannot execute code.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_atomic",
]

_MAGIC = b"FLWR-GKT-CHECKPOINT 1\n"


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be trusted (corrupt, wrong format)."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` (see the module docstring); return the path.

    ``state`` holds what ``torch.load(weights_only=True)`` can read back; the
    directory of ``path`` is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()
    write_atomic(path, _MAGIC + digest + b"\n" + data)
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one.

    A unique temporary file in the same directory is written and fsync-ed,
    renamed over ``path``, then the directory is fsync-ed; the temporary file
    is removed if anything fails. The directory of ``path`` must exist.
    """
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Read the state saved at ``path``.

    Leftover temporary files of an interrupted save are removed; ``None`` when
    there is no checkpoint.

    Raises
    ------
    CheckpointError
        When the file is not a checkpoint, its checksum does not match or it
        cannot be loaded.
    """
    path = Path(path)
    for tmp in path.parent.glob(path.name + ".*.tmp"):
        tmp.unlink(missing_ok=True)
    if not path.is_file():
        return None
    raw = path.read_bytes()
    header_end = len(_MAGIC) + 64 + 1
    if (
        not raw.startswith(_MAGIC)
        or len(raw) < header_end
        or raw[header_end - 1 : header_end] != b"\n"
    ):
        raise CheckpointError(f"{path} is not a flwr-gkt checkpoint")
    digest, data = raw[len(_MAGIC) : header_end - 1], raw[header_end:]
    if hashlib.sha256(data).hexdigest().encode() != digest:
        raise CheckpointError(f"{path} is corrupt (checksum mismatch); remove it to start over")
    try:
        state: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} cannot be loaded: {err}") from err
    return state


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Return the Python, NumPy and torch global RNG states, plus those of ``generators``.

    The states are lists, numbers and tensors (checkpoint-safe).
    """
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the legacy form of the global MT19937 state
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ],
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    """Restore what :func:`rng_state` returned, into the same ``generators`` in the same order.

    Raises
    ------
    ValueError
        If the number of generators differs from the saved one.
    """
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    for gen, gen_state in zip(generators, state["generators"], strict=True):
        gen.set_state(gen_state)
