"""The server's feature store: latest payload per node, bounded memory.

FedGKT's server trains on the features ``H^(k)``, labels ``Y^(k)`` and client
logits ``Z_c^(k)`` of every node (Algorithm 1, line 8). :class:`FeatureStore`
keeps each node's payload in memory while the total stays within a budget; the
features of a node that would exceed it are written to a ``.npy`` file and read
back with ``os.pread`` (not a memory map, whose pages count as the process's
memory), a mini-batch at a time, when the server trains. Labels and logits
always stay in memory and count towards the budget. Features keep their wire
dtype (float32, float16, or int8 with per-channel codec parameters) and are
converted a batch at a time on the training device. See docs/features.md
(*Bounded server memory*) and docs/architecture.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flwr_gkt.core.payload import Features, Payload, QuantizedBatch, to_dense
from flwr_gkt.core.training import Batch

__all__ = ["FeatureStore", "SpillFile", "StoreBatches", "return_large_blocks_to_os"]

_MB = 1024 * 1024


@dataclass
class SpillFile:
    """Where a node's features live on disk (a ``.npy`` file)."""

    path: Path
    offset: int  # bytes before the first row (the .npy header)
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        """Bytes of one feature map."""
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) as a new array."""
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if len(rows) == 0:
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        flat = out.reshape(len(rows), -1).view(np.uint8).reshape(len(rows), -1)
        # Consecutive rows are read with one call.
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for run in np.split(np.arange(len(rows)), breaks):
                first, count = int(sorted_rows[run[0]]), len(run)
                data = os.pread(fd, count * self.row_bytes, self.offset + first * self.row_bytes)
                if len(data) != count * self.row_bytes:
                    raise OSError(f"{self.path}: short read at row {first}")
                flat[order[run]] = np.frombuffer(data, dtype=np.uint8).reshape(count, -1)
        finally:
            os.close(fd)
        return out

    def read_all(self) -> np.ndarray:
        """Every row, read straight into the new array (no temporary of the file's size)."""
        out = np.empty(self.shape, dtype=self.dtype)
        buf = out.reshape(-1).view(np.uint8).data
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if _read_into(fd, buf, self.offset) != len(buf):
                raise OSError(f"{self.path}: short read")
        finally:
            os.close(fd)
        return out

    def memmap(self) -> Tensor:
        """Return the features as a tensor mapped from the file (copy-on-write, pages shared)."""
        array = np.memmap(self.path, self.dtype, "c", self.offset, self.shape)
        return torch.from_numpy(array)


def _rmdir_if_empty(directory: Path | None) -> None:
    if directory is not None and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def _unlink_all(spilled: dict[int, SpillFile], spill_dir: Path | None) -> None:
    """Remove the spill files, and ``spill_dir`` if that leaves it empty (as ``close`` does)."""
    for entry in spilled.values():
        entry.path.unlink(missing_ok=True)
    _rmdir_if_empty(spill_dir)


def _read_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``fd`` at ``offset`` (a read returns at most ~2 GB); return the bytes read."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


_MMAP_THRESHOLD = 1024 * 1024


def return_large_blocks_to_os(threshold: int = _MMAP_THRESHOLD) -> bool:
    """Have glibc serve allocations above ``threshold`` bytes with ``mmap`` (best effort).

    Replies arrive as large buffers (a node's features, tens of MB). glibc
    raises its ``mmap`` threshold to the size of each such block freed, after
    which blocks of that size come from the heap and freed ones stay in the
    process (fragmentation): resident memory then grows with the number of
    replies seen, whatever the store keeps. A fixed threshold (``mallopt``
    ``M_MMAP_THRESHOLD``, as the ``MALLOC_MMAP_THRESHOLD_`` environment variable
    would set) returns every large block to the OS when it is freed.

    Parameters
    ----------
    threshold : int
        Allocations above this many bytes are served with ``mmap``.

    Returns
    -------
    bool
        Whether the setting was applied; ``False`` where this is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class FeatureStore(Mapping[int, Payload]):
    """Latest validated payload per node, in memory up to a budget, then on disk.

    A mapping ``node_id -> Payload``: reading an in-memory entry returns the
    stored :class:`~flwr_gkt.wire.Payload` itself; reading a spilled one loads
    its features from disk (use :meth:`batches` to train without loading all).

    Parameters
    ----------
    memory_budget : int, optional
        Bytes of payload data (features, labels, logits) kept in memory; a
        node whose features would go beyond it has them written to disk.
        ``None``: no limit, nothing is written.
    spill_dir : str or Path, optional
        Directory for the spilled ``.npy`` files (created when needed; a
        temporary directory when not given, removed by :meth:`close`).
    """

    def __init__(
        self, memory_budget: int | None = None, spill_dir: str | Path | None = None
    ) -> None:
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        if self.memory_budget is not None:
            return_large_blocks_to_os()
        self._spill_dir = Path(spill_dir) if spill_dir else None
        self._payloads: dict[int, Payload] = {}
        self._spilled: dict[int, SpillFile] = {}
        # Spill files hold nodes' features: removed when the store is collected or
        # the interpreter exits, also where :meth:`close` is never called.
        weakref.finalize(self, _unlink_all, self._spilled, self._spill_dir)
        #: Removes the temporary spill directory the store made itself (``None``: none).
        self._remove_own_dir: Callable[[], object] | None = None
        self._versions: dict[int, int] = {}
        #: Features copied to the training device (:meth:`make_resident`).
        self._resident: dict[int, Tensor] = {}
        self.resident_device: torch.device | None = None

    # ---------------------------------------------------------------- mapping
    def __getitem__(self, node: int) -> Payload:
        """Return ``node``'s payload, its features read back from disk if spilled."""
        payload = self._payloads[node]
        spilled = self._spilled.get(node)
        if spilled is None:
            return payload
        return replace(payload, features=torch.from_numpy(spilled.read_all()))

    def __iter__(self) -> Iterator[int]:
        """Iterate over the stored node ids, in the order they were stored."""
        return iter(self._payloads)

    def __len__(self) -> int:
        """Return the number of stored nodes."""
        return len(self._payloads)

    def __contains__(self, node: object) -> bool:
        """Return whether a payload of ``node`` is stored (without reading it)."""
        return node in self._payloads

    # ------------------------------------------------------------------ sizes
    def num_samples(self, node: int) -> int:
        """Return the number of samples stored for ``node`` (``KeyError`` if it is not stored)."""
        return len(self._payloads[node])

    def is_spilled(self, node: int) -> bool:
        """Return whether ``node``'s features were spilled to the spill directory."""
        return node in self._spilled

    @property
    def memory_bytes(self) -> int:
        """Bytes of payload data held in memory."""
        return sum(_nbytes(p, node not in self._spilled) for node, p in self._payloads.items())

    @property
    def disk_bytes(self) -> int:
        """Bytes of feature data written to the spill directory."""
        return sum(s.shape[0] * s.row_bytes for s in self._spilled.values())

    # -------------------------------------------------------------- mutation
    def put(self, node: int, payload: Payload) -> None:
        """Store (replace) ``node``'s payload, spilling features beyond the budget.

        The newest features spill first; if the labels and logits that stay in
        memory push the total over the budget, earlier nodes' features follow
        (newest first) until it fits.
        """
        # The old payload goes only once the new one is in place: a failed spill
        # write (disk full) leaves the node's previous payload stored.
        old_payload, old_spill = self._payloads.pop(node, None), self._spilled.pop(node, None)
        self._resident.pop(node, None)
        self._payloads[node] = payload
        try:
            while self.memory_budget is not None and self.memory_bytes > self.memory_budget:
                in_memory = [n for n in self._payloads if n not in self._spilled]
                if not in_memory:
                    break  # labels and logits alone exceed the budget
                self._spill(in_memory[-1])
        except BaseException:
            new_spill = self._spilled.pop(node, None)
            if new_spill is not None:
                new_spill.path.unlink(missing_ok=True)
            self._payloads.pop(node, None)
            if old_payload is not None:
                self._payloads[node] = old_payload
            if old_spill is not None:
                self._spilled[node] = old_spill
            raise
        if old_spill is not None:
            old_spill.path.unlink(missing_ok=True)

    def stage_out(self, nodes: Iterable[int]) -> int:
        """Move the in-memory features of ``nodes`` to disk until new ones replace them.

        Called before a round whose replies will bring these nodes' fresh
        features: Flower hands a strategy all of a round's replies at once, so
        without this the old and the new features of every node would be in
        memory together. A node that then fails to reply keeps its features
        (read from disk, as a spilled node's); one that replies has them
        replaced and the file deleted. Unknown nodes are skipped.

        Returns
        -------
        int
            Bytes of features moved to disk.
        """
        moved = 0
        for node in nodes:
            payload = self._payloads.get(node)
            if payload is None or node in self._spilled or not payload.has_features:
                continue
            moved += payload.features.nbytes
            self._spill(node)
        return moved

    def stage_in(self, nodes: Iterable[int]) -> int:
        """Read staged-out features of ``nodes`` back into memory, while the budget allows.

        The inverse of :meth:`stage_out`, after the last round: the store is left
        as the server trained on it. Nodes in memory or unknown are skipped.

        Returns
        -------
        int
            Bytes of features read back.
        """
        moved = 0
        for node in nodes:
            spilled = self._spilled.get(node)
            if spilled is None or node not in self._payloads:
                continue
            size = spilled.shape[0] * spilled.row_bytes
            if self.memory_budget is not None and self.memory_bytes + size > self.memory_budget:
                continue
            self._payloads[node] = self[node]  # its features read back from disk
            del self._spilled[node]
            spilled.path.unlink(missing_ok=True)
            moved += size
        return moved

    def _spill(self, node: int) -> None:
        payload = self._payloads[node]
        self._spilled[node] = self._write(node, payload.features)
        # Labels, logits and codec parameters stay in memory (small); the features' reference
        # is dropped.
        self._payloads[node] = replace(
            payload,
            features=torch.empty(0),
            labels=payload.labels.clone(),
            logits=None if payload.logits is None else payload.logits.clone(),
        )

    def set_logits(self, node: int, logits: Tensor | None) -> None:
        """Replace the client logits of ``node`` (replay rounds send logits only).

        ``logits`` has one row per stored sample; ``None`` removes them.

        Raises
        ------
        KeyError
            If ``node`` is not stored.
        ValueError
            If the number of logits differs from the number of stored samples.
        """
        payload = self._payloads[node]
        if logits is not None and len(logits) != len(payload):
            raise ValueError(f"node {node}: {len(logits)} logits for {len(payload)} stored samples")
        self._payloads[node] = replace(payload, logits=logits)

    def remove(self, node: int) -> None:
        """Forget ``node`` and delete its spill file; a node not stored is ignored."""
        self._payloads.pop(node, None)
        self._resident.pop(node, None)
        spilled = self._spilled.pop(node, None)
        if spilled is not None:
            spilled.path.unlink(missing_ok=True)

    def share(self, node: int) -> tuple[Payload, SpillFile | None]:
        """Return ``node``'s payload for other processes, and its spill file if spilled.

        In-memory features are moved into shared memory (once: the store keeps
        the shared copy), so processes that receive the payload through
        :mod:`torch.multiprocessing` map the same pages; a spilled node's
        payload has empty features, which the receiver maps from the file
        (:meth:`SpillFile.memmap`).
        """
        payload, spilled = self._payloads[node], self._spilled.get(node)
        if spilled is None and payload.has_features and not payload.features.is_shared():
            shared = torch.empty_like(payload.features).share_memory_()
            payload = replace(payload, features=shared.copy_(payload.features))
            self._payloads[node] = payload
        return payload, spilled

    def make_resident(self, device: torch.device, budget: int) -> int:
        """Copy stored features to ``device`` while they fit ``budget`` bytes; return the bytes.

        Nodes are taken in store order; a node's features go whole or not at
        all (spilled ones are read back from disk once). Batches of resident
        nodes are then gathered on ``device``. A node stored again, or
        removed, leaves the device; so do all nodes when ``device`` changes.

        Parameters
        ----------
        device : torch.device
            The training device (a GPU; on the CPU this only costs a copy).
        budget : int
            Bytes of features the device may hold (``0``: none).

        Returns
        -------
        int
            Bytes of features resident on ``device`` afterwards.
        """
        if device != self.resident_device:
            self._resident.clear()
            self.resident_device = device
        used = self.resident_bytes
        for node in self._payloads:
            if node in self._resident:
                continue
            size = self.num_samples(node) * self._row_bytes(node)
            if size == 0 or used + size > budget:
                continue
            spilled = self._spilled.get(node)
            host = (
                torch.from_numpy(spilled.read_all())
                if spilled is not None
                else self._payloads[node].features
            )
            self._resident[node] = host.to(device)
            used += size
        return used

    @property
    def resident_bytes(self) -> int:
        """Bytes of features resident on the training device (:meth:`make_resident`)."""
        return sum(t.nbytes for t in self._resident.values())

    def _row_bytes(self, node: int) -> int:
        spilled = self._spilled.get(node)
        if spilled is not None:
            return spilled.row_bytes
        features = self._payloads[node].features
        return 0 if features.dim() != 4 else features[0].nbytes

    def close(self) -> None:
        """Remove every spill file, and the spill directory when it is left empty.

        Spilled nodes are forgotten; nodes held in memory stay. A temporary
        spill directory created by the store is removed with its contents.
        """
        for node in list(self._spilled):
            self.remove(node)
        self._resident.clear()
        if self._remove_own_dir is not None:
            self._remove_own_dir()
            self._spill_dir, self._remove_own_dir = None, None
        else:
            _rmdir_if_empty(self._spill_dir)

    def _write(self, node: int, features: Tensor) -> SpillFile:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="gkt-spill-"))
            self._remove_own_dir = weakref.finalize(
                self, shutil.rmtree, self._spill_dir, ignore_errors=True
            )
        # Every node's features: readable by this user only (dir 0700, files 0600).
        self._spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._spill_dir, 0o700)
        version = self._versions[node] = self._versions.get(node, 0) + 1
        path = self._spill_dir / f"node-{node}-v{version}.npy"
        array = np.ascontiguousarray(features.numpy())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        offset = path.stat().st_size - array.nbytes
        return SpillFile(path, offset, tuple(array.shape), array.dtype)

    # --------------------------------------------------------------- reading
    def batches(
        self,
        nodes: Sequence[int],
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        size: int | None = None,
        prefetch: bool = False,
    ) -> StoreBatches:
        """Return the :class:`StoreBatches` over ``nodes``' samples, concatenated in that order.

        The batches are read from memory, disk or the device one at a time; the
        parameters are those of :class:`StoreBatches`.
        """
        return StoreBatches(self, nodes, batch_size, shuffle, generator, size, prefetch)

    def labels(self, nodes: Iterable[int]) -> Tensor:
        """Return the labels of stored ``nodes`` (at least one), concatenated in that order."""
        return torch.cat([self._payloads[n].labels for n in nodes])

    def logits(self, nodes: Iterable[int]) -> Tensor | None:
        """Return the client logits of ``nodes``, concatenated in that order.

        ``None`` unless there is at least one node and every node has logits.
        """
        parts = [self._payloads[n].logits for n in nodes]
        if not parts or any(p is None for p in parts):
            return None
        return torch.cat([p for p in parts if p is not None])

    def gather(self, nodes: Sequence[int], index: Tensor, pin: bool = False) -> Features:
        """Return feature rows of the concatenation of ``nodes``' features.

        Rows stay in their stored dtype: float32 / float16 rows as a tensor,
        int8 rows as a :class:`~flwr_gkt.core.payload.QuantizedBatch` (each
        row with its node's codec parameters); a batch mixing dtypes is
        converted to float32 here. Spilled rows are read from disk; rows of
        resident nodes are gathered on their device (the batch goes there
        when all its nodes are resident). The concatenation is never built.

        Parameters
        ----------
        nodes : Sequence[int]
            Stored nodes, in concatenation order.
        index : Tensor
            Rows to gather (positions in the concatenation, not empty).
        pin : bool
            Gather host rows into pinned memory (for a non-blocking copy to a
            GPU).

        Returns
        -------
        Features
            The rows, in the order of ``index``.
        """
        sizes = np.array([len(self._payloads[n]) for n in nodes])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        idx = index.numpy()
        which = np.searchsorted(starts, idx, side="right") - 1
        parts = []
        for k in np.unique(which):
            mask = which == k
            local = torch.from_numpy(idx[mask] - starts[k])
            node = nodes[int(k)]
            payload, spilled = self._payloads[node], self._spilled.get(node)
            if node in self._resident:
                resident = self._resident[node]
                rows = resident[local.to(resident.device, non_blocking=True)]
            elif spilled is None:
                rows = payload.features[local]
            else:
                rows = torch.from_numpy(spilled.read(local.numpy()))
            # positions, not a boolean mask: indexing with a mask would wait for a GPU
            parts.append((torch.from_numpy(np.flatnonzero(mask)), rows, payload))
        device = parts[0][1].device if len({p[1].device for p in parts}) == 1 else None
        if device is None:  # some nodes resident, some not: meet on the host
            parts = [(m, r.cpu(), p) for m, r, p in parts]
            device = torch.device("cpu")
        quantized = {p.feature_scale is not None for _, _, p in parts}
        dtypes = {r.dtype for _, r, _ in parts}
        if quantized == {True}:
            return self._gather_quantized(parts, len(idx), device, pin)
        if quantized == {False} and len(dtypes) == 1:
            out = _alloc((len(idx), *parts[0][1].shape[1:]), dtypes.pop(), device, pin)
            for pos, rows, _ in parts:
                out[pos.to(device, non_blocking=True)] = rows
            return out
        out = _alloc((len(idx), *parts[0][1].shape[1:]), torch.float32, device, pin)
        for pos, rows, p in parts:  # mixed dtypes: convert each node's rows
            minimum, scale = (
                (None, None)
                if p.feature_min is None or p.feature_scale is None
                else (p.feature_min.to(device), p.feature_scale.to(device))
            )
            out[pos.to(device, non_blocking=True)] = to_dense(rows, minimum, scale)
        return out

    @staticmethod
    def _gather_quantized(
        parts: list[tuple[Tensor, Tensor, Payload]], n: int, device: torch.device, pin: bool
    ) -> QuantizedBatch:
        channels = parts[0][1].shape[1]
        q = _alloc((n, *parts[0][1].shape[1:]), torch.int8, device, pin)
        minimum = _alloc((n, channels), torch.float32, device, pin)
        scale = _alloc((n, channels), torch.float32, device, pin)
        for pos, rows, p in parts:
            assert p.feature_min is not None and p.feature_scale is not None
            m = pos.to(device, non_blocking=True)
            q[m] = rows
            minimum[m] = p.feature_min.to(device)
            scale[m] = p.feature_scale.to(device)
        return QuantizedBatch(q, minimum, scale)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool) -> Tensor:
    """Return an empty tensor for a gathered batch (pinned host memory with ``pin``)."""
    pinned = pin and device.type == "cpu" and torch.cuda.is_available()
    return torch.empty(shape, dtype=dtype, device=device, pin_memory=pinned)


class StoreBatches:
    """``(features, labels, index)`` batches streamed from a :class:`FeatureStore`.

    ``index`` is the position in the concatenation of ``nodes``' samples (the
    row of the teacher logits and of the captured server logits), as with
    :class:`flwr_gkt.core.training.TensorBatches`.

    Parameters
    ----------
    store : FeatureStore
        The store to read from.
    nodes : Sequence[int]
        Stored nodes whose samples are iterated over, in this order.
    batch_size : int
        Samples per batch.
    shuffle : bool
        Shuffle the samples anew on every pass (implied by ``size``).
    generator : torch.Generator, optional
        Generator of the shuffling.
    size : int, optional
        Samples per pass, drawn at random (without replacement) anew on every
        pass; ``None``: all.
    prefetch : bool
        Gather each next batch in a background thread, into pinned memory
        (for a GPU), while the current one is used.
    """

    def __init__(
        self,
        store: FeatureStore,
        nodes: Sequence[int],
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        size: int | None = None,
        prefetch: bool = False,
    ) -> None:
        self.prefetch = prefetch
        self.store = store
        self.nodes = list(nodes)
        self.labels = store.labels(self.nodes) if self.nodes else torch.empty(0, dtype=torch.long)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle or size is not None
        self.generator = generator
        self.size = len(self.labels) if size is None else min(int(size), len(self.labels))

    def __len__(self) -> int:
        """Return the number of batches per pass."""
        return -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        """Yield one pass of ``(features, labels, index)`` batches."""
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order[: self.size]
        chunks = [order[i : i + self.batch_size] for i in range(0, self.size, self.batch_size)]
        if not self.prefetch:
            for idx in chunks:
                yield self.store.gather(self.nodes, idx), self.labels[idx], idx
            return
        with ThreadPoolExecutor(1, thread_name_prefix="gkt-prefetch") as pool:
            ahead = pool.submit(self.store.gather, self.nodes, chunks[0], True) if chunks else None
            for i, idx in enumerate(chunks):
                assert ahead is not None
                features = ahead.result()
                if i + 1 < len(chunks):  # one batch ahead
                    ahead = pool.submit(self.store.gather, self.nodes, chunks[i + 1], True)
                yield features, self.labels[idx], idx


def _nbytes(payload: Payload, with_features: bool) -> int:
    size = payload.labels.nbytes + (payload.logits.nbytes if payload.logits is not None else 0)
    for params in (payload.feature_min, payload.feature_scale):
        size += 0 if params is None else params.nbytes
    return size + (payload.features.nbytes if with_features else 0)
