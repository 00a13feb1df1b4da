"""The package's layers: the plain-PyTorch core imports nothing from Flower."""

import subprocess
import sys
from pathlib import Path

import flwr_gkt

PACKAGE = Path(flwr_gkt.__file__).parent


def _modules(folder: str) -> list[str]:
    return sorted(
        f"flwr_gkt.{folder}.{p.stem}" if p.stem != "__init__" else f"flwr_gkt.{folder}"
        for p in (PACKAGE / folder).glob("*.py")
    )


def test_the_core_imports_nothing_from_flower():
    core = _modules("core")
    assert "flwr_gkt.core.server" in core and "flwr_gkt.core.training" in core
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in core)
        + "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
        + "print(bad)\n"
        + "raise SystemExit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"core modules import Flower: {out.stdout} {out.stderr}"


def test_every_module_sits_in_its_layer():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "config"]
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} >= {
        "core",
        "wire",
        "flower",
        "data",
    }
