"""Every Python snippet of the README and the user guide runs as printed.

Each ```python block is executed on its own, in a fresh namespace. The
README's ServerApp and ClientApp are then run against each other in process
for one round on a sliver of Fashion-MNIST.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from flwr_gkt.app.inprocess import run_inprocess

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/user-guide.md")
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)


def snippets(doc: str) -> list[str]:
    """The Python blocks of ``doc``, dedented."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    return [textwrap.dedent(m.group(2)) for m in BLOCK.finditer(text)]


def run_snippet(code: str, name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": name}
    exec(compile(code, name, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_snippet_runs(doc: str) -> None:
    blocks = snippets(doc)
    assert blocks, f"no python block in {doc}: is the pattern still right?"
    for number, code in enumerate(blocks, 1):
        run_snippet(code, f"{doc}[{number}]")


def test_readme_apps_train_one_round_together(caplog: pytest.LogCaptureFixture) -> None:
    (code,) = [c for c in snippets("README.md") if "ServerApp()" in c]
    apps = run_snippet(code, "README.md apps")
    server_app, client_app = apps["server_app"], apps["client_app"]
    assert isinstance(server_app, ServerApp) and isinstance(client_app, ClientApp)
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    with caplog.at_level("INFO"):
        run_inprocess(
            server_app,
            client_app,
            2,
            run_config={"num-server-rounds": 1, "data-fraction": 0.02},
            node_configs=nodes,
        )
    evals = [r.getMessage() for r in caplog.records if "round 1 eval: accuracy" in r.getMessage()]
    assert evals, "the round did not evaluate"


def test_user_guide_data_fn_gives_a_dataset_of_each_split() -> None:
    (code,) = [c for c in snippets("docs/user-guide.md") if "DatasetData(" in c]
    data = run_snippet(code, "user-guide data_fn")["data_fn"](None)
    assert len(data.train) == 64 and data.num_classes == 10
