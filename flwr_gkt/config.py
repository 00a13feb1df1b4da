"""Run configuration: YAML presets merged with Flower run config.

A run is described by :class:`RunConfig`. Its values come, in increasing
priority, from the field defaults, a YAML preset (``preset`` key: a name in a
presets directory or a path to a ``.yaml`` file) and explicit overrides (the
Flower run config, i.e. ``[tool.flwr.app.config]`` + ``flwr run --run-config``,
or ``--set`` of the Python entry). Keys are kebab-case everywhere
(``num-server-rounds``); an empty string means "not set here".
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "RunConfig",
    "add_override_argument",
    "load_preset",
    "parse_overrides",
    "resolve_config",
]


@dataclass(frozen=True)
class RunConfig:
    """All settings of a FedGKT run (see the presets for documented values).

    Immutable; build modified copies with :meth:`with_values`. Each field
    ``a_b`` is the config key ``a-b``. Numeric settings where ``0`` (or ``""``
    for strings) means "off" or "default" are noted.

    Parameters
    ----------
    dataset : str
        ``fashion-mnist``, ``cifar10``, ``cifar100`` or ``cinic10``.
    data_dir : str
        Directory of the dataset files; ``""``: the default location.
    data_fraction, test_fraction : float
        Shares of the training set split over the nodes and of the test set
        used for evaluation.
    partition : str
        ``iid`` or ``dirichlet`` (label skew).
    dirichlet_alpha : float
        Dirichlet concentration.
    min_partition_size : int
        Dirichlet: fewest samples per node.
    test_split : str
        ``global`` (test set split IID over the nodes), ``local`` (each
        node's test samples follow its training label mix) or ``whole``
        (every node evaluates on the whole test set and the reported accuracy
        is the average over nodes: the reference code's evaluation).
    augment : str
        ``auto`` (the dataset's choice), ``on`` or ``off``: random crop + flip.
    num_clients : int
        Number of nodes.
    num_server_rounds : int
        Number of rounds.
    fraction_train, fraction_evaluate : float
        Share of the nodes sampled for training / evaluation each round.
    min_nodes : int
        Fewest nodes for a round (train, evaluate and available).
    min_train_replies : int
        Fewest accepted train replies for the server model to train in a round.
    store_max_age : int
        Rounds a node's stored features stay in use without a fresh reply
        (``0``: forever).
    node_wait_timeout : float
        Seconds to wait for ``min-nodes`` connected nodes (``0``: forever).
    round_timeout : float
        Seconds a round waits for the nodes' replies.
    server_mode : str
        ``sync`` (:class:`~flwr_gkt.flower.strategy.FedGKT`) or ``async``
        (:class:`~flwr_gkt.flower.async_strategy.AsyncFedGKT`).
    max_staleness : int
        Async: largest accepted staleness of a reply (``-1``: no bound).
    async_update : str
        Async: what one server update trains on (``store``: every node's
        stored features; ``node``: the replying node's only).
    memory_budget_mb : float
        Memory budget of the server's feature store (``0``: unbounded).
    spill_dir : str
        Where features beyond the budget are written; ``""``: ``<run>/spill``.
    device_memory_budget_mb : float
        Stored features kept resident on a CUDA server device (``-1``: three
        quarters of its free memory; ``0``: none, every batch is copied from
        the host, pinned and one batch ahead). Ignored on the CPU.
    feature_upload_every : int
        Replay (EcoFed): nodes upload features every this many rounds
        (``0``: once).
    edge_model, server_model : str
        Registered model names (see :mod:`flwr_gkt.core.registry`);
        ``edge-model`` is the federation's default edge model, which a node's
        own ``edge-model`` node config overrides.
    edge_models : str
        Heterogeneous edge models in simulation: a comma-separated list of
        edge model names cycled over the partition ids (``"resnet4,resnet8"``:
        partitions 0, 2, ... use ResNet-4, partitions 1, 3, ... ResNet-8);
        ``""``: every node uses ``edge-model``. A node's ``edge-model`` node
        config still wins. Every model's extractor must output the feature
        maps the server expects (``16 x H x W``).
    edge_init : str
        ``common``: every node's edge model starts from the same weights,
        derived from ``seed`` (as every FL system starts from one model);
        ``per-node``: each node draws its own (``seed * 1000 + partition``).
    extractor_init : str
        Where the edge extractor's initial weights come from: ``random`` (the
        paper's text), ``held-out`` (pre-trained on training images no node
        holds: federated-fair) or ``pooled`` (the reference code's protocol: a
        full model trained centrally on the pooled training partitions, its
        stem copied into every edge; *not* federated-fair, for reproduction
        only). With ``held-out`` / ``pooled`` and no ``edge-pretrained``, the
        simulation entry trains the weights once and caches them in
        ``results-dir``.
    pretrain_epochs, pretrain_samples : int
        Epochs of that pre-training, and most held-out images it uses.
    edge_pretrained : str
        Local file of pre-trained extractor weights (``""``: none).
    freeze_extractor : int
        ``1``: freeze the edge extractor after initialisation (EcoFed; the
        reference code unless ``whether_training_on_client``); FedAvg and the
        centralized baselines freeze the same stem.
    edge_epochs, batch_size : int
        Local epochs ``E_c`` and edge mini-batch size.
    edge_precision, server_precision : str
        ``auto`` (default: ``bf16`` where the device runs it natively, else
        ``fp32``; measured on Fashion-MNIST over 3 seeds to match fp32's
        accuracy), ``fp32``, ``bf16`` (CUDA, or CPUs with AVX512-BF16/AMX) or
        ``fp16`` (CUDA, with a gradient scaler): autocast precision of the
        edge's and the server's training and inference (see
        :func:`flwr_gkt.core.training.autocast`); each node resolves ``auto``
        on its own device.
    server_compile : str
        ``torch.compile`` backend of the server model (``inductor``); ``""``
        (default): eager. Pays off in long runs only (see
        :class:`flwr_gkt.core.server.GKTServer`).
    edge_optimizer : str
        ``adam`` or ``sgd``.
    edge_lr : float
        Edge learning rate.
    server_epochs, server_batch_size : int
        Server epochs ``E_s`` per round and server mini-batch size.
    server_optimizer : str
        ``adam`` or ``sgd``.
    server_lr : float
        Server learning rate.
    weight_decay : float
        Weight decay of ``sgd``.
    lr_schedule : str
        ``constant``, ``cosine`` (see :func:`flwr_gkt.core.training.lr_factor`) or
        ``plateau`` (the reference's: the server learning rate is reduced when
        the round's test accuracy stops improving, the edge learning rate
        stays constant; see :class:`flwr_gkt.core.training.Plateau`).
    plateau_factor, plateau_patience : float, int
        ``plateau``: the factor applied to the server learning rate, and the
        rounds without improvement before it is applied (the reference uses
        PyTorch's defaults, 0.1 and 10).
    centralized_model : str
        ``algorithm centralized`` (Table 1's baselines): ``full`` (the FedAvg
        model, edge stem + server body) or ``edge`` (the edge model alone).
    temperature, alpha : float
        KD temperature ``T`` and weight ``alpha``.
    kd_mode : str
        ``both``, ``server_to_edge`` or ``none`` (see
        :class:`~flwr_gkt.core.losses.KDMode`).
    feature_dtype : str
        Feature codec on the wire: ``float32``, ``float16``, ``int8``, or
        ``auto``: each reply float16 when that moves no value by more than
        2^-25 (the features of bf16 edges: the same values in half the
        bytes), float32 otherwise.
    logit_dtype : str
        Logit dtype on the wire: ``float32`` or ``float16``.
    gradient_dtype : str
        Split learning: dtype of the activation gradients on the wire,
        ``float32`` or ``float16`` (the activations use ``feature-dtype``).
    split_mode : str
        Split-learning baseline of the split ServerApp
        (:mod:`flwr_gkt.app.split_app`): ``sl`` (nodes take turns, the edge
        weights relayed), ``splitfed-v1`` or ``splitfed-v2``.
    privacy_clip, privacy_logit_clip, privacy_noise : float
        Per-sample L2 clipping bounds of features and logits and Gaussian
        noise multiplier, applied on the nodes (``0``: off).
    seed : int
        Seed of partitions, initialisation and training.
    device : str
        ``auto`` (CUDA when available), ``cpu``, ``cuda``...
    server_threads, client_threads : int
        Torch threads of the server and of each node (``0``: torch's default).
    client_cpus : float
        CPUs each simulated node asks for.
    results_dir : str
        Directory of the run folders.
    run_name : str
        Name of the run's folder; ``""``: a timestamp.
    tensorboard_dir : str
        Directory of TensorBoard event files (``""``: none). Each run writes
        into ``<tensorboard-dir>/<run folder name>``, a relative path resolved
        as ``results-dir`` is (from the working directory); needs the
        ``tensorboard`` extra (:mod:`flwr_gkt.flower.tensorboard`).
    checkpoint, resume : int
        ``1``: write a checkpoint after every round / resume from it.
    node_state_dir : str
        Simulation: directory of the nodes' persistent state (``""``: none).
    max_payload_mb : float
        Largest accepted reply (``0``: no limit).
    max_samples : int
        Largest number of samples one reply may carry (``0``: no limit).
    outlier_threshold : float
        Robust deviations from the round's median beyond which a payload is
        rejected.
    logit_clip : float
        Bound client logits are clipped to before the server distils from
        them (``0``: off).
    max_abs_value : float
        Largest absolute value of any float in a reply (features,
        activations, logits, embeddings, edge weights), every algorithm
        (``0``: only NaN/Inf are refused).
    max_weight_change : float
        Split learning: largest change of the edge weights a node returns,
        relative to the norm of the weights it was sent (``0``: unchecked).
    fedagg_edges : int
        FedAgg: number of edge servers (``0``: two tiers).
    end_model, edge_tier_model, cloud_model : str
        FedAgg: tier model names (see
        :func:`flwr_gkt.core.registry.build_tier_model`).
    bridge_autoencoder : str
        FedAgg: file of the pre-trained bridge autoencoder.
    rectify : str
        FedEEC rectification: ``none``, ``swap``, ``peak`` or ``self``.
    fedagg_beta, fedagg_gamma : float
        FedAgg's KD weight ``beta`` and bridge-loss weight ``gamma``.
    fedagg_migrate : str
        FedAgg: node migrations, e.g. ``"end-3:edge-0@5"``.
    faults : str
        Injected faults, e.g. ``"crash:1@2-3, timeout:0@4"`` (see
        :mod:`flwr_gkt.flower.faults`).
    fault_rate : float
        Probability of a random fault per node and round.
    fault_kinds : str
        Kinds of random faults to choose among (``""``: all).
    server_devices : str
        Train the server's epochs with DistributedDataParallel, one worker
        process per device: ``"cuda:0,cuda:1"`` (NCCL) or ``"cpu:2"`` (two
        gloo ranks); ``""`` (default): one process on ``device``.
        ``server-batch-size`` stays the global batch: global batch = per-rank
        batch x ranks, so each rank trains on ``server-batch-size / ranks``
        samples of every batch. See docs/ddp.md.
    """

    # data
    dataset: str = "fashion-mnist"
    data_dir: str = ""
    data_fraction: float = 1.0
    test_fraction: float = 1.0
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 10
    test_split: str = "global"
    augment: str = "auto"
    # federation
    num_clients: int = 4
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    min_train_replies: int = 1
    store_max_age: int = 0
    node_wait_timeout: float = 0.0
    round_timeout: float = 3600.0
    server_mode: str = "sync"
    max_staleness: int = -1
    async_update: str = "store"
    memory_budget_mb: float = 0.0
    spill_dir: str = ""
    device_memory_budget_mb: float = -1.0
    feature_upload_every: int = 1
    # models
    edge_model: str = "resnet8"
    edge_models: str = ""
    server_model: str = "resnet55"
    edge_init: str = "common"
    extractor_init: str = "random"
    pretrain_epochs: int = 2
    pretrain_samples: int = 5000
    edge_pretrained: str = ""
    freeze_extractor: int = 0
    centralized_model: str = "full"
    # edge training (sent to the nodes every round)
    edge_epochs: int = 1
    batch_size: int = 64
    edge_optimizer: str = "adam"
    edge_lr: float = 0.001
    edge_precision: str = "auto"
    server_precision: str = "auto"
    server_compile: str = ""
    # server training
    server_epochs: int = 20
    server_batch_size: int = 64
    server_optimizer: str = "adam"
    server_lr: float = 0.001
    weight_decay: float = 5e-4
    lr_schedule: str = "constant"
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    # knowledge distillation
    temperature: float = 3.0
    alpha: float = 1.0
    kd_mode: str = "both"
    # wire
    feature_dtype: str = "float32"
    logit_dtype: str = "float32"
    gradient_dtype: str = "float32"
    split_mode: str = "sl"
    # privacy (applied on the nodes, see flwr_gkt.core.privacy; node config overrides)
    privacy_clip: float = 0.0
    privacy_logit_clip: float = 0.0
    privacy_noise: float = 0.0
    # runtime
    seed: int = 0
    device: str = "auto"
    server_threads: int = 0
    client_threads: int = 1
    client_cpus: float = 1.0
    results_dir: str = "results"
    run_name: str = ""
    tensorboard_dir: str = ""
    # reliability
    checkpoint: int = 1
    resume: int = 0
    node_state_dir: str = ""
    max_payload_mb: float = 0.0
    max_samples: int = 0
    outlier_threshold: float = 10.0
    logit_clip: float = 0.0
    max_abs_value: float = 1e4
    max_weight_change: float = 10.0
    # FedAgg / FedEEC (see docs/fedagg.md; BSBODP uses batch-size, edge-optimizer, edge-lr, edge-epochs)
    fedagg_edges: int = 0
    end_model: str = "cnn"
    edge_tier_model: str = "resnet10"
    cloud_model: str = "resnet18"
    bridge_autoencoder: str = ""
    rectify: str = "none"
    fedagg_beta: float = 10.0
    fedagg_gamma: float = 1.0
    fedagg_migrate: str = ""
    # fault injection (simulation and tests; see flwr_gkt.flower.faults)
    faults: str = ""
    fault_rate: float = 0.0
    fault_kinds: str = ""
    # distributed server training (see docs/ddp.md)
    server_devices: str = ""

    @classmethod
    def keys(cls) -> list[str]:
        """Return the kebab-case keys accepted in presets and run config.

        Returns
        -------
        list[str]
            One key per field, in field order (``num-server-rounds``, ...).
        """
        return [f.name.replace("_", "-") for f in fields(cls)]

    def with_values(self, values: Mapping[str, Any]) -> RunConfig:
        """Return a copy with kebab-case ``values`` applied; ``""`` means unset.

        Each value is cast to the field's type (``int``, ``float`` or ``str``).

        Parameters
        ----------
        values : Mapping[str, Any]
            New values by kebab-case key; a value ``""`` leaves the field as
            it is.

        Returns
        -------
        RunConfig
            The updated copy (``self`` is unchanged).

        Raises
        ------
        KeyError
            If a key is not a field of :class:`RunConfig`.
        ValueError
            If a value cannot be cast to the field's type (a float with a
            fractional part for an ``int`` field included).
        """
        types = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in types:
                raise KeyError(f"unknown config key {key!r}; known: {self.keys()}")
            if value == "":
                continue
            caster = {"int": int, "float": float, "str": str}[str(types[name])]
            if caster is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{key} must be an integer, got {value}")
            changes[name] = caster(value)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return all values as a dict with kebab-case keys.

        Returns
        -------
        dict[str, Any]
            ``{key: value}`` for every field, e.g. ``{"dataset": "fashion-mnist", ...}``.
        """
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


def load_preset(preset: str, presets_dir: str | Path | None = None) -> dict[str, Any]:
    """Read a YAML preset given by name (in ``presets_dir``) or by path.

    Parameters
    ----------
    preset : str
        A path ending in ``.yaml`` / ``.yml``, or a name looked up as
        ``<presets_dir>/<name>.yaml``.
    presets_dir : str | Path, optional
        Directory of the named presets.

    Returns
    -------
    dict[str, Any]
        The preset's keys and values (empty for an empty file).

    Raises
    ------
    FileNotFoundError
        If the file does not exist, or a name is given without
        ``presets_dir``; the message lists the available presets.
    ValueError
        If the file does not hold a mapping.
    """
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        if presets_dir is None:
            raise FileNotFoundError(f"preset {preset!r}: no presets directory given")
        path = Path(presets_dir) / f"{preset}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(presets_dir).glob("*.yaml")) if presets_dir else []
        raise FileNotFoundError(f"preset {preset!r} not found at {path}; available: {available}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"preset {path} must be a mapping of config keys")
    return data


def resolve_config(
    overrides: Mapping[str, Any], presets_dir: str | Path | None = None
) -> RunConfig:
    """Build the run's :class:`RunConfig`: defaults <- preset <- overrides.

    Starts from the field defaults, applies the preset named by
    ``overrides["preset"]`` (if set and not empty), then the other overrides.

    Parameters
    ----------
    overrides : Mapping[str, Any]
        Kebab-case keys and values (e.g. the Flower run config); ``""`` values
        are ignored. Not modified.
    presets_dir : str | Path, optional
        Directory of the named presets (see :func:`load_preset`).

    Returns
    -------
    RunConfig
        The resolved configuration.

    Raises
    ------
    KeyError
        If a key is unknown.
    FileNotFoundError
        If the preset is not found.
    ValueError
        If the preset is not a mapping or a value has the wrong type.
    """
    overrides = dict(overrides)
    preset = str(overrides.pop("preset", "") or "")
    config = RunConfig()
    if preset:
        config = config.with_values(load_preset(preset, presets_dir))
    return config.with_values(overrides)


def add_override_argument(
    parser: argparse.ArgumentParser,
    help: str = "override a config key (repeatable; also 'k1=v1 k2=v2')",
) -> None:
    """Add the ``--set KEY=VALUE ...`` option (into ``overrides``) of the commands.

    Read it back with :func:`parse_overrides`.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser.
    help : str
        The option's help text.
    """
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars.

    Each item may hold several whitespace-separated ``key=value`` pairs
    (``"a=1 b=x"``); ``key=`` gives ``""``.

    Parameters
    ----------
    items : list[str]
        The strings, e.g. the ``--set`` arguments of the command line.

    Returns
    -------
    dict[str, Any]
        Values by key (later pairs win).

    Raises
    ------
    ValueError
        If a pair has no ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        for part in item.split():
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"expected key=value, got {part!r}")
            out[key.strip()] = yaml.safe_load(value) if value else ""
    return out
