"""Glue shared by the ServerApp and the ClientApp: config, data and models."""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from flwr_gkt.config import RunConfig, resolve_config
from flwr_gkt.core.distributed import parse_devices
from flwr_gkt.core.edge import EdgeRoundConfig
from flwr_gkt.core.efficiency import forward_flops, num_parameters, run_costs
from flwr_gkt.core.losses import KDMode
from flwr_gkt.core.models import FEATURE_CHANNELS, EdgeModel, FullResNet, load_pretrained
from flwr_gkt.core.privacy import PrivacyConfig
from flwr_gkt.core.registry import build_edge_model, build_full_model, build_server_model
from flwr_gkt.core.server import GKTServer
from flwr_gkt.data import ClientData, client_data
from flwr_gkt.data import dataset_info as data_info

from .report import Run, plot_runs

PRESETS_DIR = Path(__file__).parent / "presets"


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Resolve the Flower run config (preset + overrides) into a RunConfig."""
    return resolve_config(run_config, PRESETS_DIR)


def dataset_info(cfg: RunConfig) -> tuple[int, int, int]:
    """``(num_classes, image channels, image side)`` of the configured dataset."""
    info = data_info(cfg.dataset)
    return info.num_classes, info.channels, info.side


def feature_shape(cfg: RunConfig) -> tuple[int, int, int]:
    _, _, side = dataset_info(cfg)
    return (FEATURE_CHANNELS, side, side)


@functools.lru_cache(maxsize=256)
def load_client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """The node's partition (cached per process: nodes reuse it every round)."""
    if cfg.augment not in ("auto", "on", "off"):
        raise ValueError(f"augment must be auto, on or off, got {cfg.augment!r}")
    return client_data(
        partition_id,
        num_partitions,
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        fraction=cfg.data_fraction,
        test_fraction=cfg.test_fraction,
        partition=cfg.partition,
        dirichlet_alpha=cfg.dirichlet_alpha,
        min_partition_size=cfg.min_partition_size,
        test_split=cfg.test_split,
        augment=None if cfg.augment == "auto" else cfg.augment == "on",
        seed=cfg.seed,
    )


@dataclasses.dataclass(frozen=True)
class NodeSetup:
    """What a node takes from its node config (``--node-config`` of a SuperNode).

    ``partition-id`` / ``num-partitions``: which part of the dataset this node
    holds (default ``0`` / ``1``: the whole local dataset, for a device that has
    its own data). ``data-dir``: where the node's files are (overrides the run
    config's ``data-dir``). ``state-dir``: where the node saves its state after
    each round, so that a restarted SuperNode keeps it (no ``state-dir``: a
    restarted node starts fresh; in simulation, the run config's
    ``node-state-dir`` gives each partition ``<node-state-dir>/node-<id>``).
    ``privacy-clip`` / ``privacy-logit-clip`` /
    ``privacy-noise``: the node's own privacy settings (over the run config's;
    see :mod:`flwr_gkt.core.privacy`). ``node-uid``: the node's identity across
    restarts (default ``partition-<id>-of-<n>``), by which a resumed server
    finds the node again. ``edge-pretrained``: the node's own file of
    pre-trained extractor weights. ``edge-model``: the node's own edge model
    (a registered name, e.g. ``resnet4`` on a weak device); without it the
    run config's ``edge-models`` list (by partition id, see
    :func:`partition_edge_model`) or ``edge-model`` decides. The server
    checks the shape of the features every node sends, whatever its model.

    **Who decides.** The node's state directory, data directory, pre-trained
    weights and privacy settings are the node's: in a deployment (a SuperNode
    running the app's module-level ClientApp) they come *only* from its node
    config, so a server's run config cannot make a node write elsewhere, load
    another file or switch its privacy off. The run config supplies them as
    defaults only when the ClientApp is built with a trusted local config
    (``make_client_app(fixed=cfg)``: ``python -m simulation``, the in-process
    runtime, tests).
    """

    partition_id: int
    num_partitions: int
    cfg: RunConfig
    state_dir: str
    privacy: PrivacyConfig | None = None
    uid: str = ""

    @property
    def edge_model(self) -> str:
        """The node's edge model (registry name): ``cfg.edge_model``, resolved for this node."""
        return self.cfg.edge_model


#: Set to ``1`` in the environment of a federation that this machine runs whole
#: from one user's config (the Python entry's ``flwr run`` on a private
#: SuperLink): its nodes then take the node-side settings from the run config
#: as a local simulation does. A SuperNode operator does not set it.
TRUST_ENV = "FLWR_GKT_TRUSTED_RUN_CONFIG"


def run_config_trusted(fixed: RunConfig | None) -> bool:
    """Whether the run config is the node's own: a fixed local config, or :data:`TRUST_ENV`."""
    return fixed is not None or os.environ.get(TRUST_ENV) == "1"


#: Run-config keys that belong to the node (see :class:`NodeSetup`).
NODE_SIDE_KEYS = (
    "data-dir",
    "node-state-dir",
    "edge-pretrained",
    "privacy-clip",
    "privacy-logit-clip",
    "privacy-noise",
)


_MODEL_NAME = re.compile(r"[A-Za-z0-9._:@+-]+")


def edge_model_list(cfg: RunConfig) -> list[str]:
    """The names of ``edge-models`` (comma-separated; ``[]`` when empty).

    Raises
    ------
    ValueError
        If an entry is empty or not a plain model name.
    """
    if not cfg.edge_models.strip():
        return []
    names = [name.strip() for name in cfg.edge_models.split(",")]
    for name in names:
        if not _MODEL_NAME.fullmatch(name):
            raise ValueError(
                f"edge-models must be a comma-separated list of edge model names "
                f"(e.g. 'resnet4,resnet8'), got {cfg.edge_models!r}"
            )
    return names


def partition_edge_model(cfg: RunConfig, partition_id: int) -> str:
    """The edge model of partition ``partition_id`` by the run config alone.

    ``edge-models`` cycled over the partition ids when set, else
    ``edge-model``. A node's ``edge-model`` node config overrides it (see
    :func:`node_setup`).
    """
    names = edge_model_list(cfg)
    return names[partition_id % len(names)] if names else cfg.edge_model


def federation_edge_models(cfg: RunConfig) -> list[str]:
    """The edge model of each of the run's ``num-clients`` partitions (run config alone)."""
    return [partition_edge_model(cfg, pid) for pid in range(cfg.num_clients)]


def node_setup(cfg: RunConfig, node_config: Mapping[str, Any], trusted: bool = False) -> NodeSetup:
    """Read this node's partition, directories, weights and privacy from its node config.

    ``trusted``: the run config is the node's own (simulation from a local
    config) and supplies defaults for the node-side settings; otherwise they
    come from the node config alone (see :class:`NodeSetup`).
    """
    pid = int(node_config.get("partition-id", 0))
    num = int(node_config.get("num-partitions", 1))
    if not trusted:  # a deployment: the server's run config does not decide these
        cfg = dataclasses.replace(
            cfg,
            data_dir="",
            node_state_dir="",
            edge_pretrained="",
            privacy_clip=0.0,
            privacy_logit_clip=0.0,
            privacy_noise=0.0,
        )
    data_dir = str(node_config.get("data-dir", "") or "")
    if data_dir:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    pretrained = str(node_config.get("edge-pretrained", "") or "")
    if pretrained:
        cfg = dataclasses.replace(cfg, edge_pretrained=pretrained)
    state_dir = str(node_config.get("state-dir", "") or "")
    if not state_dir and cfg.node_state_dir:  # simulation: one directory per partition
        state_dir = str(Path(cfg.node_state_dir) / f"node-{pid}")
    privacy = PrivacyConfig.from_mapping(
        node_config, PrivacyConfig(cfg.privacy_clip, cfg.privacy_logit_clip, cfg.privacy_noise)
    )
    uid = str(node_config.get("node-uid", "") or f"partition-{pid}-of-{num}")
    # the node's own model > the run config's list by partition > the run's edge-model
    edge_model = str(node_config.get("edge-model", "") or "") or partition_edge_model(cfg, pid)
    if edge_model != cfg.edge_model:
        cfg = dataclasses.replace(cfg, edge_model=edge_model)
    return NodeSetup(pid, num, cfg, state_dir, privacy if privacy.enabled else None, uid)


def node_data(
    cfg: RunConfig, node_config: Mapping[str, Any], trusted: bool = False
) -> tuple[NodeSetup, ClientData]:
    """This node's setup (see :func:`node_setup`) and its (cached) data."""
    node = node_setup(cfg, node_config, trusted)
    return node, load_client_data(node.cfg, node.partition_id, node.num_partitions)


#: Where the edge extractor's initial weights come from (``extractor-init``).
EXTRACTOR_INITS = ("random", "held-out", "pooled")


def edge_seed(cfg: RunConfig, partition_id: int) -> int:
    """Seed of a node's initial edge weights: the run's (``edge-init: common``) or its own."""
    if cfg.edge_init == "common":
        return cfg.seed
    if cfg.edge_init == "per-node":
        return cfg.seed * 1000 + partition_id
    raise ValueError(f"unknown edge-init {cfg.edge_init!r} (expected 'common' or 'per-node')")


def edge_builder(
    cfg: RunConfig, partition_id: int, common_extractor: str = ""
) -> Callable[[], EdgeModel]:
    """A zero-argument builder of this node's initial edge model (``cfg.edge_model``).

    Every node starts from the same weights (``edge-init: common``), with the
    pre-trained extractor of ``edge-pretrained`` when set, frozen with
    ``freeze-extractor``. Pass the node's resolved config
    (:attr:`NodeSetup.cfg`), which names its own edge model.

    ``common_extractor``: the federation's ``edge-model``. A node of another
    edge model (heterogeneous federation) then starts its extractor from that
    model's seeded extractor when the two have the same architecture, so that
    every extractor starts equal, as in a homogeneous federation (the seeded
    weights of a model's extractor also depend on the classifier built with
    it); its classifier keeps its own initial weights.
    """
    num_classes, channels, _ = dataset_info(cfg)
    if cfg.extractor_init not in EXTRACTOR_INITS:
        raise ValueError(f"unknown extractor-init {cfg.extractor_init!r}; known: {EXTRACTOR_INITS}")
    if cfg.extractor_init != "random" and not cfg.edge_pretrained:
        raise ValueError(
            f"extractor-init {cfg.extractor_init} needs edge-pretrained (the weights file); "
            "`python -m simulation` makes it (flwr_gkt.app.task.prepare_extractor)"
        )
    seed = edge_seed(cfg, partition_id)

    def build() -> EdgeModel:
        torch.manual_seed(seed)
        model = build_edge_model(cfg.edge_model, num_classes, channels)
        if common_extractor and common_extractor != cfg.edge_model and cfg.edge_init == "common":
            torch.manual_seed(seed)
            reference = build_edge_model(common_extractor, num_classes, channels).extractor
            own = model.extractor.state_dict()
            ref = reference.state_dict()
            if own.keys() == ref.keys() and all(own[k].shape == ref[k].shape for k in own):
                model.extractor.load_state_dict(ref)
        if cfg.edge_pretrained:  # EcoFed: a pre-trained extractor from a local file
            load_pretrained(model, cfg.edge_pretrained, "extractor")
        if cfg.freeze_extractor:
            model.freeze_extractor()
        return model

    return build


def build_full(cfg: RunConfig) -> torch.nn.Module:
    """The full model (edge stem + server body) of FedAvg and the centralized baseline.

    Its stem starts from exactly the weights every FedGKT edge extractor starts
    from (common initialisation, pre-trained ``edge-pretrained`` included) and
    is frozen with ``freeze-extractor``, so that a table separates the
    algorithm from the initialisation.
    """
    num_classes, channels, _ = dataset_info(cfg)
    torch.manual_seed(cfg.seed)
    model = build_full_model(cfg.server_model, num_classes, channels)
    stem = getattr(model, "stem", None)
    if isinstance(stem, torch.nn.Module):
        edge = edge_builder(dataclasses.replace(cfg, freeze_extractor=0), 0)()
        stem.load_state_dict(edge.extractor.state_dict())
        if cfg.freeze_extractor and isinstance(model, FullResNet):
            model.freeze_stem()
    return model


def pooled_training_data(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of every node's training partition (the centralized baselines' data)."""
    parts = [load_client_data(cfg, i, cfg.num_clients) for i in range(cfg.num_clients)]
    return torch.cat([p.x_train for p in parts]), torch.cat([p.y_train for p in parts])


def held_out_options(cfg: RunConfig, samples: int, epochs: int) -> dict[str, Any]:
    """Keyword arguments of a held-out pre-training function for the run's federation.

    The samples are drawn from the training images no node of ``cfg``'s
    federation holds (same ``data-fraction``, ``num-clients``, ``seed``); used
    for the edge extractor (:func:`flwr_gkt.data.pretrain.pretrain_edge`) and
    the FedAgg bridge autoencoder.
    """
    return {
        "dataset": cfg.dataset,
        "data_dir": cfg.data_dir,
        "fraction": cfg.data_fraction,
        "num_partitions": cfg.num_clients,
        "seed": cfg.seed,
        "samples": samples,
        "epochs": epochs,
        "device": cfg.device,
    }


def prepare_extractor(cfg: RunConfig) -> RunConfig:
    """Make the pre-trained extractor that ``extractor-init`` asks for; return the config using it.

    ``random`` (or ``edge-pretrained`` already set): ``cfg`` unchanged.
    ``held-out``: :func:`flwr_gkt.data.pretrain.pretrain_edge` on up to
    ``pretrain-samples`` training images no node holds. ``pooled``:
    :func:`flwr_gkt.data.pretrain.pretrain_pooled`, the full model trained on the
    union of the nodes' partitions (the reference's protocol, not
    federated-fair). Either trains ``pretrain-epochs`` epochs; the file is
    cached in ``results-dir`` under a name made of the settings it depends
    on, so the runs of an experiment share it.
    """
    from flwr_gkt.data.pretrain import pretrain_edge, pretrain_pooled

    if cfg.extractor_init == "random" or cfg.edge_pretrained:
        return cfg
    if cfg.extractor_init not in EXTRACTOR_INITS:
        raise ValueError(f"unknown extractor-init {cfg.extractor_init!r}; known: {EXTRACTOR_INITS}")
    keys = ["dataset", "data-fraction", "num-clients", "seed", "edge-model", "pretrain-epochs"]
    if cfg.extractor_init == "held-out":
        keys += ["pretrain-samples"]
    else:
        keys += ["server-model", "partition", "dirichlet-alpha", "min-partition-size"]
    values = cfg.to_dict()
    tag = hashlib.sha256(json.dumps([values[k] for k in keys]).encode()).hexdigest()[:10]
    path = Path(cfg.results_dir).expanduser() / f"extractor-{cfg.extractor_init}-{tag}.pt"
    if not path.is_file():
        start = time.perf_counter()
        if cfg.extractor_init == "held-out":
            result = pretrain_edge(
                path,
                edge_model=cfg.edge_model,
                **held_out_options(cfg, cfg.pretrain_samples, cfg.pretrain_epochs),
            )
        else:
            x, y = pooled_training_data(cfg)
            result = pretrain_pooled(
                path,
                x,
                y,
                num_classes=dataset_info(cfg)[0],
                server_model=cfg.server_model,
                epochs=cfg.pretrain_epochs,
                seed=cfg.seed,
                device=cfg.device,
            )
        print(
            f"extractor-init {cfg.extractor_init}: trained on {int(result['samples'])} images "
            f"in {time.perf_counter() - start:.0f}s -> {path}",
            flush=True,
        )
    return dataclasses.replace(cfg, edge_pretrained=str(path))


def init_record(cfg: RunConfig) -> dict[str, Any]:
    """How the run's models were initialised, for ``results.json``."""
    return {
        "edge-init": cfg.edge_init,
        "extractor-init": cfg.extractor_init
        if not cfg.edge_pretrained
        else (cfg.extractor_init if cfg.extractor_init != "random" else "file"),
        "extractor-frozen": bool(cfg.freeze_extractor),
        # pooled: every node's images were seen centrally to make the extractor
        "federated-fair": cfg.extractor_init != "pooled",
    }


def build_server(cfg: RunConfig) -> torch.nn.Module:
    num_classes, _, _ = dataset_info(cfg)
    torch.manual_seed(cfg.seed)
    return build_server_model(cfg.server_model, num_classes, FEATURE_CHANNELS)


def make_gkt_server(cfg: RunConfig, spill_dir: str | Path | None = None) -> GKTServer:
    """The server model with its optimizer and feature store, as configured.

    ``memory-budget-mb`` > 0 bounds the feature store's memory; the rest spills
    to ``spill-dir`` (default: ``spill_dir``, e.g. the run's results directory).
    """
    if cfg.server_threads > 0:
        torch.set_num_threads(cfg.server_threads)
    return GKTServer(
        build_server(cfg),
        epochs=cfg.server_epochs,
        batch_size=cfg.server_batch_size,
        optimizer=cfg.server_optimizer,
        lr=cfg.server_lr,
        weight_decay=cfg.weight_decay,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        kd_mode=cfg.kd_mode,
        device=cfg.device,
        precision=cfg.server_precision,
        compile_backend=cfg.server_compile or None,
        seed=cfg.seed,
        memory_budget=int(cfg.memory_budget_mb * 1024 * 1024) if cfg.memory_budget_mb > 0 else None,
        spill_dir=cfg.spill_dir or spill_dir,
        device_memory_budget=(
            None
            if cfg.device_memory_budget_mb < 0
            else int(cfg.device_memory_budget_mb * 1024 * 1024)
        ),
        devices=parse_devices(cfg.server_devices),
    )


def edge_config(cfg: RunConfig) -> EdgeRoundConfig:
    """The per-round edge settings the server sends to the nodes."""
    return EdgeRoundConfig(
        epochs=cfg.edge_epochs,
        batch_size=cfg.batch_size,
        optimizer=cfg.edge_optimizer,
        lr=cfg.edge_lr,
        weight_decay=cfg.weight_decay,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        kd_mode=KDMode(cfg.kd_mode),
        freeze_extractor=bool(cfg.freeze_extractor),
        precision=cfg.edge_precision,
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (the ServerApp's, in simulation)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_figures(baseline_mb: float, history: list[dict[str, Any]]) -> dict[str, float]:
    """The server's memory against the bytes it stores, for ``results.json``.

    Parameters
    ----------
    baseline_mb : float
        :func:`peak_rss_mb` just before the first round: the process with torch,
        Flower (and, in simulation, Ray's driver) imported and the server model
        built, before any feature arrived.
    history : list[dict]
        The run's per-round rows (``store-memory-mb``: the stored bytes in
        memory after the round's replies).

    Returns
    -------
    dict[str, float]
        ``server-peak-rss-mb``, ``server-baseline-rss-mb``,
        ``store-peak-mb`` (the most bytes stored in memory after any round),
        ``server-peak-rss-ratio`` (peak / stored) and
        ``server-added-rss-ratio`` ((peak - baseline) / stored): NaN ratios
        when nothing was stored.
    """
    peak = peak_rss_mb()
    stored = max((float(row.get("store-memory-mb", 0.0)) for row in history), default=0.0)
    nan = float("nan")
    return {
        "server-peak-rss-mb": peak,
        "server-baseline-rss-mb": baseline_mb,
        "store-peak-mb": stored,
        "server-peak-rss-ratio": peak / stored if stored else nan,
        "server-added-rss-ratio": (peak - baseline_mb) / stored if stored else nan,
    }


def results_dir(cfg: RunConfig) -> Path:
    name = cfg.run_name or time.strftime("fedgkt-%Y%m%d-%H%M%S")
    path = Path(cfg.results_dir).expanduser() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=8)
def model_costs(cfg: RunConfig, node_models: tuple[str, ...] = ()) -> dict[str, Any]:
    """FLOPs per sample and parameters of the run's edge, server and full models.

    ``node_models``: the edge model of each node (default: the run config's,
    :func:`federation_edge_models`). When they are not all ``edge-model``
    (heterogeneous federations), ``edge-flops`` / ``edge-params`` are the
    mean over the nodes and ``edge-models`` holds each model's own figures
    and node count (models this process cannot build are left out).
    """
    num_classes, channels, side = dataset_info(cfg)
    costs: dict[str, Any] = run_costs(cfg.edge_model, cfg.server_model, num_classes, channels, side)
    models = list(node_models) or federation_edge_models(cfg)
    if set(models) <= {cfg.edge_model}:
        return costs
    per_model: dict[str, dict[str, int]] = {}
    for name in dict.fromkeys(models):
        if name == cfg.edge_model:
            edge = {k: costs[k] for k in ("edge-flops", "edge-params")}
        else:
            try:
                model = build_edge_model(name, num_classes, channels)
            except (KeyError, TypeError):  # e.g. a model registered on its nodes only
                continue
            edge = {
                "edge-flops": forward_flops(model, (channels, side, side)),
                "edge-params": num_parameters(model),
            }
        per_model[name] = {**edge, "nodes": models.count(name)}
    counted = [per_model[m] for m in models if m in per_model]
    for key in ("edge-flops", "edge-params"):
        costs[key] = round(sum(c[key] for c in counted) / len(counted))
    costs["edge-models"] = per_model
    return costs


def edge_model_record(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Which edge model each node used and, per model, its nodes' final edge accuracy.

    Read from the node history (the ``edge-model`` a node named in its train
    replies, see :mod:`flwr_gkt.wire.gate`): ``{"by-node": {node-id: model},
    "edge-accuracy": {model: accuracy}}``, the accuracy of each model being
    the sample-weighted mean of its nodes' last evaluate replies; ``{}`` when
    no node named its model.
    """
    by_node: dict[int, str] = {}
    last_eval: dict[int, tuple[float, float]] = {}
    for row in nodes:
        if row.get("edge-model"):
            by_node[int(row["node-id"])] = str(row["edge-model"])
        if row.get("stage") == "evaluate" and row.get("status") == "accepted":
            if "edge-accuracy" in row:
                n = float(row.get("num-examples", 1))
                last_eval[int(row["node-id"])] = (float(row["edge-accuracy"]), n)
    if not by_node:
        return {}
    totals: dict[str, list[float]] = {}
    for node, (acc, n) in last_eval.items():
        if node in by_node:
            t = totals.setdefault(by_node[node], [0.0, 0.0])
            t[0], t[1] = t[0] + acc * n, t[1] + n
    return {
        "by-node": {str(n): m for n, m in sorted(by_node.items())},
        "edge-accuracy": {m: t[0] / t[1] for m, t in sorted(totals.items()) if t[1] > 0},
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_results(
    path: Path,
    cfg: RunConfig,
    history: list[dict[str, float]],
    extra: dict[str, Any],
    nodes: list[dict[str, Any]] | None = None,
) -> None:
    """Write metrics.csv (one row per round), results.json (config, history,
    model costs, ``extra``), metrics.png (accuracy vs round and vs bytes) and,
    when given, nodes.csv (one row per node, stage and round) and, when the
    nodes named their edge models, results.json's ``edge-models``
    (:func:`edge_model_record`)."""
    _write_csv(path / "metrics.csv", history)
    models = edge_model_record(nodes) if nodes is not None else {}
    if nodes is not None:
        _write_csv(path / "nodes.csv", nodes)
    node_models = tuple(models["by-node"].values()) if models else ()
    costs = model_costs(cfg, node_models)
    extra = {"algorithm": "fedgkt", "costs": costs, "init": init_record(cfg), **extra}
    if models:
        extra["edge-models"] = models
    with open(path / "results.json", "w") as f:
        json.dump({"config": cfg.to_dict(), "history": history, **extra}, f, indent=2)
    run = Run(cfg.run_name or path.name, path, cfg.to_dict(), history, extra)
    plot_runs(
        [run],
        path / "metrics.png",
        title=f"{run.algorithm}: {cfg.dataset}, {cfg.num_clients} nodes",
    )
