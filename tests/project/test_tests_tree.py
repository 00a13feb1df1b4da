"""The test tree: one folder per layer, shared helpers apart, no test module importing another."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
#: Where test modules live: the package's layers, real processes, the project itself.
TEST_FOLDERS = {"core", "data", "wire", "flower", "app", "e2e", "project"}
#: Where ``tests/...`` paths are written down: docs, CI, the code and the tests.
MENTIONS = ["README.md", "CHANGELOG.md", "CONTRIBUTING.md", "Makefile", "pyproject.toml"]
MENTIONS += ["requirements.txt", "docs", "deploy", ".ci", "flwr_gkt", "tests", "examples"]
MENTIONS += ["benchmarks", "simulation"]
SUFFIXES = {".md", ".py", ".sh", ".toml", ".txt", ""}
TEST_PATH = re.compile(r"(?<![\w./-])tests/[\w./-]*\w")


def imported_test_modules(path: Path) -> list[str]:
    """The ``test_*`` modules that the module at ``path`` imports, at any depth of its code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            sep = "" if base.endswith(".") or not base else "."
            names = [base, *(f"{base}{sep}{alias.name}" for alias in node.names)]
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names = [str(node.args[0].value)]
        else:
            continue
        hits = [n for n in names if any(part.startswith("test_") for part in n.split("."))]
        found += hits[:1]
    return found


def test_no_test_module_imports_another_test_module():
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in imported_test_modules(path)
    ]
    assert not found, "move what is shared to tests/helpers/ or a fixture:\n" + "\n".join(found)


def test_the_import_check_finds_every_way_of_importing_a_test_module(tmp_path):
    path = tmp_path / "test_mod.py"
    path.write_text(
        "import importlib\n"
        "from test_hostile import SHAPE\n"
        "import tests.wire.test_trust\n"
        "from tests.wire import test_trust as trust\n"
        "from tests.helpers.gkt import SHAPE, make_strategy\n"
        "def f():\n"
        "    from . import test_split\n"
        "    return importlib.import_module('test_data')\n"
    )
    assert imported_test_modules(path) == [
        "test_hostile",
        "tests.wire.test_trust",
        "tests.wire.test_trust",
        ".test_split",
        "test_data",
    ]


def test_every_test_module_sits_in_a_layer_folder_of_the_tests_package():
    misplaced = [
        str(path.relative_to(TESTS))
        for path in TESTS.rglob("test_*.py")
        if path.parent.parent != TESTS or path.parent.name not in TEST_FOLDERS
    ]
    assert not misplaced, misplaced
    folders = [p for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    assert {p.name for p in folders} == TEST_FOLDERS | {"helpers"}
    assert all((p / "__init__.py").is_file() for p in [TESTS, *folders])


def test_every_test_path_named_in_the_docs_ci_and_code_exists():
    missing = []
    for root in MENTIONS:
        path = ROOT / root
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if file.suffix not in SUFFIXES or file == Path(__file__):
                continue
            text = file.read_text(encoding="utf-8", errors="replace")
            for number, line in enumerate(text.splitlines(), 1):
                for name in TEST_PATH.findall(line):
                    if not (ROOT / name).exists():
                        missing.append(f"{file.relative_to(ROOT)}:{number}: {name}")
    assert not missing, "\n".join(missing)
