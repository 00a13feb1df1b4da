"""Server training on several devices with DistributedDataParallel (plain PyTorch).

:class:`DistributedTrainer` starts one worker process per device (one DDP
rank each: NCCL on CUDA, gloo on the CPU) the first time it trains, and keeps
them until :meth:`DistributedTrainer.close` (also called when the trainer is
collected or the interpreter exits). Each :meth:`DistributedTrainer.fit` is
one step, handed out by the process that holds the server: every rank gets
the model's and the optimizer's state (the learning rate included), the
stored features of the nodes to train on -- in shared memory, or as spill
files each rank maps, never one copy per rank -- and each epoch's sample
order, drawn by the server from its own generator.

Every global batch of ``batch_size`` samples of that order is split over the
``R`` ranks interleaved (rank ``r`` takes positions ``r, r + R, ...``); each
rank's mean loss is weighted by ``R`` times its share of the batch, so DDP's
gradient average is the gradient of the global batch's mean loss: the global
batch is ``batch_size`` whatever ``R`` (each rank's batch is
``batch_size / R``). Rank 0 returns the trained state; every rank returns
the last epoch's logits of its samples, merged into ``Z_s``. BatchNorm layers
become :class:`torch.nn.SyncBatchNorm` on CUDA (statistics of the global
batch); on the CPU, where PyTorch has no SyncBatchNorm, each rank normalises
with its own part of the batch. See docs/ddp.md.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flwr_gkt.core.losses import gkt_loss
from flwr_gkt.core.payload import Features, Payload, QuantizedBatch
from flwr_gkt.core.store import FeatureStore, SpillFile
from flwr_gkt.core.training import Batch, FitResult, fit, make_optimizer, prepare_model

__all__ = ["DistributedError", "DistributedTrainer", "ShardedEpochs", "parse_devices"]


class DistributedError(RuntimeError):
    """A worker of the distributed server training failed, exited or did not answer."""


def parse_devices(spec: str) -> list[str]:
    """Return the devices of a ``server-devices`` value, one per rank.

    ``"cuda:0,cuda:1"``: those devices; ``"cpu:2"``: two CPU ranks (``"cpu"``
    is one); ``""``: none (no distributed training).

    Raises
    ------
    ValueError
        If CPU and CUDA devices are mixed, or a CUDA device is named twice.
    """
    devices: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part.startswith("cpu"):
            count = part.partition(":")[2]
            devices += ["cpu"] * int(count or 1)
        elif part:
            devices.append(str(torch.device(part)))
    if len({d.split(":")[0] for d in devices}) > 1:
        raise ValueError(f"server-devices {spec!r} mixes device types")
    if devices and devices[0] != "cpu" and len(set(devices)) < len(devices):
        raise ValueError(f"server-devices {spec!r} names a device twice")
    return devices


@dataclass(frozen=True)
class _Step:
    """What every rank needs for one :meth:`DistributedTrainer.fit`."""

    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    nodes: list[tuple[int, Payload, SpillFile | None]]
    teacher: Tensor | None
    orders: list[Tensor]
    batch_size: int
    temperature: float
    alpha: float
    precision: str
    capture: int | None
    device_memory_budget: int | None


@dataclass(frozen=True)
class _RankResult:
    loss_sum: float
    correct: int
    seen: int
    logits: Tensor | None
    state: tuple[dict[str, Tensor], dict[str, Any]] | None  # rank 0's model and optimizer


def _cpu(obj: Any) -> Any:
    """``obj`` (tensors, nested in dicts, lists and tuples) with every tensor copied to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class ShardedEpochs:
    """One rank's part of every epoch's global batches, and the loss that weights it.

    Epoch ``e`` follows ``orders[e]`` (positions in the concatenation of
    ``nodes``' samples), cut into global batches of ``batch_size``; the rank
    yields positions ``rank, rank + world, ...`` of each (possibly none).
    Pass :meth:`loss` as :func:`~flwr_gkt.core.training.fit`'s ``loss_fn``:
    it scales the rank's mean loss by ``world`` times its share of the batch
    and sums the unscaled loss of the epoch in :attr:`loss_sum`.
    """

    def __init__(
        self,
        store: FeatureStore,
        nodes: Sequence[int],
        orders: Sequence[Tensor],
        batch_size: int,
        rank: int,
        world: int,
        temperature: float = 3.0,
        alpha: float = 1.0,
    ) -> None:
        self.store, self.nodes, self.orders = store, list(nodes), list(orders)
        self.labels = store.labels(self.nodes)
        self.batch_size, self.rank, self.world = int(batch_size), rank, world
        self.temperature, self.alpha = temperature, alpha
        self.epoch = 0
        self.weight = 1.0
        self.loss_sum = torch.zeros((), dtype=torch.float64)

    def __len__(self) -> int:
        """Return the number of global batches of the next epoch."""
        return -(-len(self.orders[min(self.epoch, len(self.orders) - 1)]) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        """Yield this rank's ``(features, labels, index)`` of each global batch of the next epoch."""
        order = self.orders[self.epoch]
        self.epoch += 1
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            idx = chunk[self.rank :: self.world]
            self.weight = len(idx) * self.world / len(chunk)
            if len(idx):
                features = self.store.gather(self.nodes, idx)
            else:  # a last batch smaller than the ranks: an empty one keeps DDP in step
                features = _no_rows(self.store.gather(self.nodes, chunk[:1]))
            yield features, self.labels[idx], idx

    def loss(
        self, model: nn.Module, inputs: Tensor, labels: Tensor, teacher: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Return the weighted FedGKT loss of the rank's batch, and its logits."""
        logits = model(inputs)
        if len(labels) == 0:  # zero gradients, but every parameter takes part in the reduction
            return logits.float().sum() * 0.0, logits
        loss = gkt_loss(logits.float(), labels, teacher, self.temperature, self.alpha)
        self.loss_sum = self.loss_sum + loss.detach().double().cpu() * len(labels)
        return loss * self.weight, logits


def _no_rows(rows: Features) -> Features:
    """``rows`` without any row (same dtype, shape and codec)."""
    if isinstance(rows, QuantizedBatch):
        return QuantizedBatch(rows.q[:0], rows.minimum[:0], rows.scale[:0])
    return rows[:0]


class _Rank:
    """A worker's DDP replica of the server model and its optimizer."""

    def __init__(
        self, rank: int, world: int, device: str, init_file: str, model: nn.Module, opt: str
    ) -> None:
        self.rank, self.world, self.device = rank, world, torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT),
        )
        # The model arrived in memory shared with the other ranks: train a private copy.
        model = copy.deepcopy(model)
        if cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = prepare_model(model, self.device)
        self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if cuda else None)
        # lr and weight decay come with each step's optimizer state
        self.optimizer = make_optimizer(opt, self.ddp.parameters(), 0.0)

    def run(self, step: _Step) -> _RankResult:
        """Train one step; return this rank's counts and logits (and rank 0's state)."""
        self.model.load_state_dict(step.model)
        # Private copies: the optimizer would update the tensors shared with the other ranks.
        self.optimizer.load_state_dict(_cpu(step.optimizer))
        store = FeatureStore()
        for node, payload, spilled in step.nodes:
            store.put(
                node, payload if spilled is None else replace(payload, features=spilled.memmap())
            )
        if self.device.type == "cuda" and step.device_memory_budget != 0:
            free, _ = torch.cuda.mem_get_info(self.device)
            store.make_resident(self.device, step.device_memory_budget or int(free * 0.75))
        shards = ShardedEpochs(
            store, [n for n, _, _ in step.nodes], step.orders, step.batch_size,
            self.rank, self.world, step.temperature, step.alpha,
        )  # fmt: skip
        result = fit(
            self.ddp,
            shards,
            self.optimizer,
            epochs=len(step.orders),
            device=self.device,
            teacher_logits=step.teacher,
            capture_logits=step.capture,
            loss_fn=shards.loss,
            precision=step.precision,
        )
        state = None
        if self.rank == 0:
            state = (_cpu(self.model.state_dict()), _cpu(self.optimizer.state_dict()))
        correct = round(result.accuracy * result.num_examples)
        loss_sum = float(shards.loss_sum)
        return _RankResult(loss_sum, correct, result.num_examples, result.last_epoch_logits, state)


#: Seconds a collective operation (gradient all-reduce) may wait for the other ranks.
_COLLECTIVE_TIMEOUT = 600.0


def _next_step(conn: Connection, parent: int) -> _Step | None:
    """Wait for the next step; ``None`` when told to stop or when the parent is gone."""
    while not conn.poll(1.0):
        if os.getppid() != parent:
            return None
    step: _Step | None = conn.recv()
    return step


def _worker(
    rank: int,
    world: int,
    device: str,
    init_file: str,
    model: nn.Module,
    optimizer: str,
    threads: int,
    conn: Connection,
    parent: int,
) -> None:
    """Run one DDP rank: train each step sent through ``conn`` until told to stop."""
    try:
        if device == "cpu":
            torch.set_num_threads(threads)
        replica = _Rank(rank, world, device, init_file, model, optimizer)
        conn.send(("ok", os.getpid()))
        while (step := _next_step(conn, parent)) is not None:
            conn.send(("ok", replica.run(step)))
    except BaseException as error:  # reported to the parent, which raises it
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Worker:
    rank: int
    device: str
    process: Any  # a multiprocessing process of the spawn context
    conn: Connection


@dataclass
class _Pool:
    """The running workers and their rendezvous directory (what a finalizer must stop)."""

    workers: list[_Worker] = field(default_factory=list)
    directory: Path | None = None


def _stop(pool: _Pool, grace: float = 5.0) -> None:
    """Stop the workers (ask, then terminate, then kill) and remove the rendezvous directory."""
    for worker in pool.workers:
        with contextlib.suppress(OSError):
            worker.conn.send(None)
    deadline = time.monotonic() + grace
    for worker in pool.workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
    for worker in pool.workers:
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(grace)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
    pool.workers.clear()
    if pool.directory is not None:
        shutil.rmtree(pool.directory, ignore_errors=True)
        pool.directory = None


class DistributedTrainer:
    """The server's epochs on several devices, one DDP worker process per device.

    Parameters
    ----------
    model : nn.Module
        The server model; each worker gets a copy of its architecture (the
        weights come with every step).
    devices : Sequence[str]
        One device per rank: all ``"cpu"`` (gloo) or distinct CUDA devices
        (NCCL); see :func:`parse_devices`.
    optimizer : str
        The server optimizer's name (:func:`~flwr_gkt.core.training.make_optimizer`).
    step_timeout : float, optional
        Seconds a step may take before it fails; ``None``: no limit (a worker
        that exits fails the step at once either way).
    start_timeout : float
        Seconds the workers may take to start.
    """

    def __init__(
        self,
        model: nn.Module,
        devices: Sequence[str],
        optimizer: str = "adam",
        step_timeout: float | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        if not devices:
            raise ValueError("DistributedTrainer needs at least one device")
        self.devices = list(devices)
        self.optimizer = optimizer
        self.step_timeout, self.start_timeout = step_timeout, start_timeout
        self._template = copy.deepcopy(model).to("cpu")
        self._pool = _Pool()
        # Workers stop with the trainer, or at the latest when the interpreter exits.
        weakref.finalize(self, _stop, self._pool)

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers (empty before the first step and after :meth:`close`)."""
        return [int(w.process.pid) for w in self._pool.workers]

    def start(self) -> None:
        """Start the workers (done by the first :meth:`fit`); wait until each is ready."""
        if self._pool.workers:
            return
        ctx = mp.get_context("spawn")
        directory = self._pool.directory = Path(tempfile.mkdtemp(prefix="gkt-ddp-"))
        threads = max(1, torch.get_num_threads() // len(self.devices))
        for rank, device in enumerate(self.devices):
            conn, child = ctx.Pipe()
            rendezvous = str(directory / "rendezvous")
            args: tuple[Any, ...] = (rank, len(self.devices), device, rendezvous)
            args += (self._template, self.optimizer, threads, child, os.getpid())
            process = ctx.Process(target=_worker, args=args, daemon=True, name=f"gkt-ddp-{rank}")
            process.start()
            child.close()
            self._pool.workers.append(_Worker(rank, device, process, conn))
        try:
            self._collect(self.start_timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers; a later :meth:`fit` starts new ones."""
        _stop(self._pool)

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        store: FeatureStore,
        nodes: Sequence[int],
        orders: Sequence[Tensor],
        *,
        batch_size: int,
        teacher_logits: Tensor | None = None,
        temperature: float = 3.0,
        alpha: float = 1.0,
        capture_logits: int | None = None,
        precision: str = "fp32",
        device_memory_budget: int | None = None,
    ) -> FitResult:
        """Train ``model`` and ``optimizer`` (updated in place) one epoch per order, on the ranks.

        The arguments are those of :func:`~flwr_gkt.core.training.fit`, with
        ``orders`` (each epoch's sample positions) in place of the batches.

        Raises
        ------
        DistributedError
            If a worker fails, exits or does not answer in time; the workers
            are then stopped and the model and optimizer are left as they were.
        """
        start = time.perf_counter()
        self.start()
        step = _Step(
            _cpu(model.state_dict()), _cpu(optimizer.state_dict()),
            [(n, *store.share(n)) for n in nodes], teacher_logits, list(orders),
            int(batch_size), temperature, alpha, precision, capture_logits, device_memory_budget,
        )  # fmt: skip
        try:
            for worker in self._pool.workers:
                self._send(worker, step)
            replies: list[_RankResult] = self._collect(self.step_timeout)
        except BaseException:
            self.close()
            raise
        assert replies[0].state is not None
        model.load_state_dict(replies[0].state[0])
        optimizer.load_state_dict(_cpu(replies[0].state[1]))  # not rank 0's shared memory
        seen = sum(r.seen for r in replies)
        return FitResult(
            loss=sum(r.loss_sum for r in replies) / max(seen, 1),
            accuracy=sum(r.correct for r in replies) / max(seen, 1),
            num_examples=seen,
            seconds=time.perf_counter() - start,
            last_epoch_logits=self._merge(replies, step),
        )

    def _merge(self, replies: list[_RankResult], step: _Step) -> Tensor | None:
        """Return the last epoch's logits, each row from the rank that trained on that sample."""
        if replies[0].logits is None:
            return None
        merged = replies[0].logits.clone()
        last = step.orders[-1]
        owner = (torch.arange(len(last)) % step.batch_size) % len(replies)
        for rank, reply in enumerate(replies[1:], start=1):
            assert reply.logits is not None
            rows = last[owner == rank]
            merged[rows] = reply.logits[rows]
        return merged

    def _collect(self, timeout: float | None) -> list[Any]:
        """Each worker's next reply, in rank order; raise if one fails, exits or times out."""
        replies: dict[int, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(replies) < len(self._pool.workers):
            pending = [w for w in self._pool.workers if w.rank not in replies]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not wait([w.conn for w in pending] + [w.process.sentinel for w in pending], left):
                ranks = [w.rank for w in pending]
                raise DistributedError(
                    f"server training: no reply from rank(s) {ranks} in {timeout} s"
                )
            for worker in pending:
                if worker.conn.poll():
                    replies[worker.rank] = self._receive(worker)
                elif not worker.process.is_alive():
                    raise DistributedError(self._exited(worker))
        return [replies[rank] for rank in range(len(self._pool.workers))]

    def _send(self, worker: _Worker, step: _Step) -> None:
        try:
            worker.conn.send(step)
        except OSError:
            worker.process.join(1.0)
            raise DistributedError(self._exited(worker)) from None

    def _receive(self, worker: _Worker) -> Any:
        try:
            status, value = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(1.0)
            raise DistributedError(self._exited(worker)) from None
        if status == "error":
            time.sleep(0.5)  # a peer that died is the cause: name it
            dead = [self._exited(w) for w in self._pool.workers if not w.process.is_alive()]
            raise DistributedError(
                "; ".join([*dead, f"server training failed on rank {worker.rank}: {value}"])
            )
        return value

    @staticmethod
    def _exited(worker: _Worker) -> str:
        return (
            f"server training worker rank {worker.rank} on {worker.device} (pid "
            f"{worker.process.pid}) exited with code {worker.process.exitcode}"
        )
