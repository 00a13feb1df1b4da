"""Run configuration: YAML presets merged with Flower run config.

A run is described by :class:`RunConfig`. Its values come, in increasing
priority, from the field defaults, a YAML preset (``preset`` key: a name in a
presets directory or a path to a ``.yaml`` file) and explicit overrides (the
Flower run config, i.e. ``[tool.flwr.app.config]`` + ``flwr run --run-config``,
or ``--set`` of the Python entry). Keys are kebab-case everywhere
(``num-server-rounds``); an empty string means "not set here".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RunConfig", "load_preset", "parse_overrides", "resolve_config"]


@dataclass(frozen=True)
class RunConfig:
    """All settings of a FedGKT run (see the presets for documented values)."""

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
    feature_upload_every: int = 1
    # models
    edge_model: str = "resnet8"
    server_model: str = "resnet55"
    edge_pretrained: str = ""
    freeze_extractor: int = 0
    # edge training (sent to the nodes every round)
    edge_epochs: int = 1
    batch_size: int = 64
    edge_optimizer: str = "adam"
    edge_lr: float = 0.001
    # server training
    server_epochs: int = 20
    server_batch_size: int = 64
    server_optimizer: str = "adam"
    server_lr: float = 0.001
    weight_decay: float = 5e-4
    lr_schedule: str = "constant"
    # knowledge distillation
    temperature: float = 3.0
    alpha: float = 1.0
    kd_mode: str = "both"
    # wire
    feature_dtype: str = "float32"
    logit_dtype: str = "float32"
    # privacy (applied on the nodes, see flwr_gkt.privacy; node config overrides)
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
    # reliability
    checkpoint: int = 1
    resume: int = 0
    node_state_dir: str = ""
    max_payload_mb: float = 0.0
    max_samples: int = 0
    outlier_threshold: float = 10.0
    logit_clip: float = 0.0
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
    # fault injection (simulation and tests; see flwr_gkt.faults)
    faults: str = ""
    fault_rate: float = 0.0
    fault_kinds: str = ""

    @classmethod
    def keys(cls) -> list[str]:
        """The kebab-case keys accepted in presets and run config."""
        return [f.name.replace("_", "-") for f in fields(cls)]

    def with_values(self, values: Mapping[str, Any]) -> RunConfig:
        """Return a copy with kebab-case ``values`` applied; ``""`` means unset."""
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
        """Kebab-case dict of all values."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


def load_preset(preset: str, presets_dir: str | Path | None = None) -> dict[str, Any]:
    """Read a YAML preset given by name (in ``presets_dir``) or by path."""
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
    """Defaults <- preset named by ``overrides['preset']`` <- other overrides."""
    overrides = dict(overrides)
    preset = str(overrides.pop("preset", "") or "")
    config = RunConfig()
    if preset:
        config = config.with_values(load_preset(preset, presets_dir))
    return config.with_values(overrides)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        for part in item.split():
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"expected key=value, got {part!r}")
            out[key.strip()] = yaml.safe_load(value) if value else ""
    return out
