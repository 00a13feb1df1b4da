"""Run configuration: presets, overrides, pyproject keys."""

from pathlib import Path

import pytest

from flwr_gkt.app.task import PRESETS_DIR
from flwr_gkt.config import RunConfig, load_preset, parse_overrides, resolve_config


def test_config_precedence_and_types(tmp_path):
    cfg = resolve_config({"preset": "smoke"}, PRESETS_DIR)
    assert cfg.num_server_rounds == 2 and cfg.server_model == "resnet10"
    cfg = resolve_config(
        {"preset": "smoke", "num-server-rounds": 7, "server-model": "", "alpha": "0.5"}, PRESETS_DIR
    )
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
    with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
        app_config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    # Equal: `flwr run --run-config` drops keys that the app's config does not declare.
    assert set(app_config) - {"preset"} == keys
