"""The public API: every documented name imports from ``flwr_gkt`` itself, cheaply.

``flwr_gkt/__init__.py`` maps each public name to the module that defines it
and imports that module on first use; type checkers read the same names from
its ``TYPE_CHECKING`` block. ``python -m simulation --cpu`` reports the
precision ``precision: auto`` trains in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flwr_gkt
from flwr_gkt.app.__main__ import build_config
from flwr_gkt.core.training import bf16_supported

ROOT = Path(__file__).resolve().parents[2]

#: The names the README documents; more may be public.
DOCUMENTED = {
    "FedGKT",
    "AsyncFedGKT",
    "GKTServer",
    "EdgeRoundConfig",
    "handle_train",
    "handle_evaluate",
    "ClientData",
    "DatasetData",
    "EdgeModel",
    "RunConfig",
    "build_edge_model",
    "build_server_model",
    "register_edge_model",
    "register_server_model",
    "FedAgg",
    "handle_fedagg",
    "SplitLearning",
    "FedGKTLegacy",
}


def test_every_public_name_resolves_to_its_defining_object() -> None:
    assert set(flwr_gkt.__all__) >= DOCUMENTED
    for name in flwr_gkt.__all__:
        value = getattr(flwr_gkt, name)
        if name == "__version__":
            continue
        module = __import__(flwr_gkt._EXPORTS[name], fromlist=[name])
        assert value is getattr(module, name), name
    assert set(flwr_gkt._EXPORTS) | {"__version__"} == set(flwr_gkt.__all__)
    assert set(flwr_gkt.__all__) <= set(dir(flwr_gkt))


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = flwr_gkt.no_such_name  # type: ignore[attr-defined]


def test_type_checkers_see_every_public_name() -> None:
    tree = ast.parse((ROOT / "flwr_gkt" / "__init__.py").read_text(encoding="utf-8"))
    blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
    ]
    assert len(blocks) == 1
    imported: dict[str, str] = {}
    for node in blocks[0].body:
        if isinstance(node, ast.ImportFrom) and node.module != "typing":
            imported.update({alias.name: str(node.module) for alias in node.names})
    assert imported == flwr_gkt._EXPORTS


def test_importing_the_package_imports_neither_torch_nor_flower() -> None:
    code = (
        "import sys, flwr_gkt; "
        "heavy = sorted(m for m in ('torch', 'flwr', 'numpy') if m in sys.modules); "
        "print(','.join(heavy) or 'none')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "none"


def test_cpu_flag_reports_the_precision_auto_resolves_to(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_config(["--cpu"])
    assert exit_info.value.code == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    bf16 = bf16_supported(torch.device("cpu"))
    assert lines["cpu bf16"].startswith("yes" if bf16 else "no")
    assert lines["cpu precision auto"] == ("bf16" if bf16 else "fp32")
    assert "usable cores" in lines["cpu"]
