"""The package's layers: ``app > flower > wire > data > core``, checked by import-linter."""

import shutil
import subprocess
import sys
from pathlib import Path

import flwr_gkt

PACKAGE = Path(flwr_gkt.__file__).parent
ROOT = PACKAGE.parent
LINT = (
    "import sys; from importlinter.cli import lint_imports_command; "
    "sys.argv[0] = 'lint-imports'; sys.exit(lint_imports_command())"
)


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
    )


def test_the_import_contracts_hold():
    out = _lint(ROOT, ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout


def test_the_contracts_catch_a_layer_broken_upwards_and_flower_in_the_core(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "flwr_gkt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    bridge = tmp_path / "flwr_gkt" / "core" / "bridge.py"
    bridge.write_text(bridge.read_text() + "\nimport flwr.app\nimport flwr_gkt.data\n")
    out = _lint(tmp_path, tmp_path)
    assert out.returncode != 0
    assert "Layers: app > flower > wire > data > core BROKEN" in out.stdout
    assert "nothing from Flower BROKEN" in out.stdout
    assert "flwr_gkt.core.bridge -> flwr_gkt.data" in out.stdout


def test_the_core_imports_nothing_from_flower_even_through_other_packages():
    """What import-linter cannot see: an import of Flower inside a third-party package."""
    core = sorted(
        f"flwr_gkt.core.{p.stem}" for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__"
    )
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
