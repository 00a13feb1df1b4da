"""The scripts in ``examples/`` run as a user runs them, on tiny data (``--tiny``).

Each test starts the script in a fresh process from the repository root and
checks the outcome it reports on its last ``RESULT {...}`` line (JSON).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_example(script: str, *args: str, tmp_path: Path, timeout: float = 300) -> dict:
    """Run ``examples/<script> --tiny ARGS`` with results in ``tmp_path``; its RESULT as a dict."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / script),
            "--tiny",
            "--results-dir",
            str(tmp_path / "results"),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line:\n{log[-5000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_custom_models(tmp_path):
    result = run_example("custom_models.py", tmp_path=tmp_path)
    assert result["edge-model"] == "tiny-cnn" and result["server-model"] == "small-cnn"
    assert result["rounds"] == 2 and result["nodes"] == 2
    assert result["test-examples"] == 200  # 2% of the 10k test set
    assert result["accuracy"] > 0.2  # edge extractor + custom server; chance is 0.1
    assert 0.0 <= result["edge-accuracy"] <= 1.0
    assert 0 < result["edge-params"] < result["server-params"]
    saved = json.loads((tmp_path / "results" / "custom-models" / "results.json").read_text())
    assert saved["config"]["edge-model"] == "tiny-cnn"
    assert saved["config"]["server-model"] == "small-cnn"
    assert len(saved["history"]) == 2


def test_flwr_datasets_partitioners(tmp_path):
    result = run_example(
        "flwr_datasets_partitioners.py",
        "--partitioner",
        "pathological",
        "--classes-per-node",
        "2",
        "--test-split",
        "local",
        tmp_path=tmp_path,
    )
    counts, test_counts = result["label-counts"], result["test-label-counts"]
    assert result["partitioner"] == "pathological" and len(counts) == result["nodes"] == 3
    for row, test_row in zip(counts, test_counts, strict=True):
        assert len(row) == 10 and sum(row) > 0
        assert sum(1 for c in row if c > 0) <= 2  # PathologicalPartitioner: 2 classes per node
        # local test split: a node is tested on its own classes only
        assert {c for c, n in enumerate(test_row) if n} <= {c for c, n in enumerate(row) if n}
    assert sum(map(sum, counts)) <= 450  # partitions of the 450-image subset
    assert result["rounds"] == 2
    assert result["nodes-replied"] == [3, 3]  # every node trained every round
    assert result["test-examples"] == sum(map(sum, test_counts)) == 150
    assert result["accuracy"] > 0.3  # each node's own 2 classes (10-class chance: 0.1)


@pytest.mark.parametrize(
    "args",
    [("--source", "hf", "--flip"), ("--source", "torch", "--partitioner", "dirichlet")],
    ids=["hf-with-transform", "torch-dataset"],
)
def test_own_dataset(args, tmp_path):
    result = run_example("own_dataset.py", *args, tmp_path=tmp_path)
    assert result["source"] == args[1] and result["nodes"] == 3
    assert sum(map(sum, result["label-counts"])) == 450  # partitions of the 450-image subset
    assert result["rounds"] == 2 and result["nodes-replied"] == [3, 3]
    assert result["labels-in-order"]  # the server holds each node's labels in dataset order
    assert result["test-examples"] == 150
    assert result["accuracy"] > 0.2  # 10 classes: chance is 0.1


def test_switch_codecs(tmp_path):
    result = run_example("switch_codecs.py", tmp_path=tmp_path)
    runs = result["runs"]
    assert set(runs) == {"float32:float32", "float16:float32", "int8:float32"}
    f32, f16, i8 = (runs[k] for k in ("float32:float32", "float16:float32", "int8:float32"))
    for run in runs.values():
        assert len(run["bytes-up-train"]) == 2  # one entry per round
        assert run["bytes-up-train"][0] == run["bytes-up-train"][1] > 0  # same samples each round
        assert run["bytes-down-train"][0] == 0 < run["bytes-down-train"][1]  # Z_s from round 2
    up = f32["bytes-up-train"][0]
    assert 0.2 < i8["bytes-up-train"][0] / up < 0.35  # int8 features: ~1/4 of float32
    assert 0.45 < f16["bytes-up-train"][0] / up < 0.55  # float16: ~1/2
    assert 0.2 < i8["bytes-up-eval"][0] / f32["bytes-up-eval"][0] < 0.35
    assert result["up-ratio"]["int8:float32"] == pytest.approx(
        i8["bytes-up-train"][0] / up, abs=1e-3
    )
    assert f32["accuracy"] > 0.2  # chance is 0.1
    # Same logit codec: the server logits sent down are the same size.
    assert f32["bytes-down-train"] == f16["bytes-down-train"] == i8["bytes-down-train"]

    wire = result["wire"]
    assert wire["float32"]["max-abs-error"] == 0.0
    assert 0.0 < wire["float16"]["max-abs-error"] < 1e-2
    assert 0.0 < wire["int8"]["max-abs-error"] <= wire["int8"]["error-bound"] * 1.001
    assert 0.2 < wire["int8"]["bytes"] / wire["float32"]["bytes"] < 0.35
    assert 0.45 < wire["float16"]["bytes"] / wire["float32"]["bytes"] < 0.55
