"""The code's shape: short functions and package ``__init__`` files that only re-export."""

import ast
from pathlib import Path

import flwr_gkt

PACKAGE = Path(flwr_gkt.__file__).parent
MAX_FUNCTION_LINES = 60


def code_lines(path: Path, node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of code of a function's body: its docstring, blank lines and comments left out."""
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        body = body[1:]
    source = path.read_text().splitlines()
    lines = {
        n
        for statement in body
        for n in range(statement.lineno, (statement.end_lineno or statement.lineno) + 1)
        if source[n - 1].strip() and not source[n - 1].strip().startswith("#")
    }
    return len(lines)


def test_code_lines_count_what_a_reader_reads(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        'def f():\n    """Doc.\n\n    More.\n    """\n    a = 1\n\n    # note\n    return a\n'
    )
    (node,) = ast.parse(path.read_text()).body
    assert isinstance(node, ast.FunctionDef) and code_lines(path, node) == 2


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = code_lines(path, node)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}::{node.name}: {n} lines")
    assert not long, "functions over 60 lines of code:\n" + "\n".join(long)


#: Private names of other libraries read for lack of a public API, each for one reason.
FOREIGN_PRIVATE = {
    "torch.ops.mkldnn._is_mkldnn_bf16_supported",  # what oneDNN's bf16 kernels need
    "probe._check_integrity",  # torchvision's CIFAR check of the files it found
}


def test_no_code_reads_another_objects_private_attributes():
    """``x._name`` only for ``self``, ``cls`` and ``super()``: helpers take what they need."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or ast.unparse(node) in FOREIGN_PRIVATE:
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super":
                continue
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "private attributes of other objects:\n" + "\n".join(found)


def test_package_init_files_only_re_export():
    """No code in ``__init__.py``: the front door's lazy ``__getattr__`` / ``__dir__`` aside."""
    for path in sorted(PACKAGE.rglob("__init__.py")):
        tree = ast.parse(path.read_text())
        defined = [
            n.name
            for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ]
        assert set(defined) <= {"__getattr__", "__dir__"}, f"{path}: {defined}"
        if path.parent != PACKAGE:  # the front door lists the whole public API
            assert len(path.read_text().splitlines()) <= 65, path
