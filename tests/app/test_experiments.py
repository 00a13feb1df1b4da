"""Experiment runner, reports (CSV/JSON/PNG, markdown table), model costs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from flwr.app import ArrayRecord

from flwr_gkt.app.experiment import EXPERIMENTS_DIR, load_experiment, run_command
from flwr_gkt.app.report import find_runs, markdown_table, write_long_csv
from flwr_gkt.app.summary import main as summary_main
from flwr_gkt.app.task import PRESETS_DIR, config_from_run_config, load_client_data, write_results
from flwr_gkt.config import RunConfig
from flwr_gkt.core.efficiency import forward_flops, run_costs
from flwr_gkt.core.models import resnet8
from flwr_gkt.core.registry import build_full_model
from flwr_gkt.wire import record_nbytes

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024


def _history(acc, up, down):
    return [
        {
            "round": i + 1,
            "accuracy": a,
            "bytes-up-train": u,
            "bytes-down-train": d,
            "round-seconds": 1.0,
        }
        for i, (a, u, d) in enumerate(zip(acc, up, down, strict=True))
    ]


def test_results_files_and_markdown_table(tmp_path):
    a = RunConfig(run_name="kd-none", kd_mode="none", results_dir=str(tmp_path))
    b = RunConfig(run_name="kd-both", kd_mode="both", results_dir=str(tmp_path))
    for cfg, acc in ((a, [0.5, 0.6]), (b, [0.55, 0.7])):
        out = tmp_path / cfg.run_name
        out.mkdir()
        write_results(out, cfg, _history(acc, [3 * MB, 3 * MB], [0, MB]), {"seconds": 12.0})
        assert {"metrics.csv", "results.json", "metrics.png"} <= {p.name for p in out.iterdir()}
        saved = json.loads((out / "results.json").read_text())
        assert saved["costs"]["edge-params"] == 10_298  # resnet8 on 1x28x28, 10 classes
        assert saved["algorithm"] == "fedgkt" and saved["config"]["kd-mode"] == cfg.kd_mode
    runs = find_runs([tmp_path])
    assert [r.name for r in runs] == ["kd-both", "kd-none"]
    table = markdown_table(runs)
    header, _, *rows = table.strip().splitlines()
    assert "kd-mode" in header and "edge-model" not in header  # only keys that differ
    assert "| kd-both | fedgkt | both | 2 | 70.00% |" in rows[0]
    assert "| 6.000 | 1.000 |" in rows[0]  # MB up (2 x 3 MB) and down
    write_long_csv(runs, tmp_path / "long.csv")
    with open(tmp_path / "long.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["cumulative-train-mb"]) for r in rows if r["run"] == "kd-none"] == [3.0, 7.0]
    # the summary command renders the same table, and a plot
    assert (
        summary_main(
            [str(tmp_path), "--output", str(tmp_path / "t.md"), "--plot", str(tmp_path / "p.png")]
        )
        == 0
    )
    assert (tmp_path / "t.md").read_text() == table and (tmp_path / "p.png").stat().st_size > 10_000
    assert summary_main([str(tmp_path / "nothing-here")]) == 1


def test_run_costs_match_flop_counter():
    costs = run_costs("resnet8", "resnet55", 10, 3, 32)
    assert costs["edge-flops"] == forward_flops(resnet8(10, 3), (3, 32, 32))
    assert costs["edge-params"] == 10_586 and costs["server-params"] == 590_858
    assert costs["full-params"] == 591_322  # ResNet-56
    assert 8.5 < costs["full-flops"] / costs["edge-flops"] < 9.5  # paper: ~9x
    assert 50 < costs["full-params"] / costs["edge-params"] < 60  # paper: ~54x


def test_every_experiment_is_valid_and_uses_known_presets_and_keys():
    keys = set(RunConfig.keys())
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    assert {"fedgkt-vs-fedavg", "ablation-kd", "ablation-edge", "scale-clients"} <= set(names)
    for name in names:
        _, spec = load_experiment(name)
        for run, body in spec["runs"].items():
            body = body or {}
            preset = body.get("preset", spec.get("preset"))
            assert (PRESETS_DIR / f"{preset}.yaml").is_file(), (name, run)
            assert set(body.get("set") or {}) | set(spec.get("set") or {}) <= keys, (name, run)
            cmd = run_command(spec, run, Path("/tmp/x"), {})
            assert cmd[cmd.index("--preset") + 1] == preset


def test_fedgkt_and_fedavg_side_by_side_on_the_same_dirichlet_partitions(tmp_path):
    """One command: both algorithms, same partitions, one CSV + plot + table."""
    exp = tmp_path / "mini.yaml"
    exp.write_text(
        "title: mini comparison\n"
        "preset: smoke\n"
        "runtime: inprocess\n"
        "set: {partition: dirichlet, dirichlet-alpha: 0.5, min-partition-size: 20, server-epochs: 1}\n"
        "runs:\n"
        "  gkt: {algorithm: fedgkt}\n"
        "  avg: {algorithm: fedavg}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flwr_gkt.app.experiment",
            str(exp),
            "--results-dir",
            str(tmp_path / "res"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/2] gkt: started" in proc.stdout and "eval: accuracy" in proc.stdout  # progress
    out = tmp_path / "res" / "mini"
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["algorithm"], r["round"]) for r in rows] == [
        ("gkt", "fedgkt", "1"),
        ("gkt", "fedgkt", "2"),
        ("avg", "fedavg", "1"),
        ("avg", "fedavg", "2"),
    ]
    assert (out / "comparison.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "| gkt | fedgkt |" in summary and "| avg | fedavg |" in summary
    gkt = {int(r["round"]): r for r in rows if r["run"] == "gkt"}
    avg = {int(r["round"]): r for r in rows if r["run"] == "avg"}
    # Same partitions: the server trained on exactly the nodes' Dirichlet partitions,
    # FedAvg's nodes evaluated the same test splits.
    cfg = config_from_run_config(
        {"preset": "smoke", "partition": "dirichlet", "min-partition-size": 20}
    )
    sizes = [len(load_client_data(cfg, i, 2).y_train) for i in range(2)]
    assert sizes[0] != sizes[1]  # label skew gives unequal sizes
    assert float(gkt[2]["server-train-examples"]) == sum(sizes)
    assert float(gkt[2]["num-examples"]) == float(avg[2]["num-examples"]) == 500
    for run in (gkt, avg):
        assert float(run[2]["accuracy"]) > 0.2  # above chance (0.1) after 2 rounds
        assert float(run[2]["cumulative-train-mb"]) > float(run[1]["cumulative-train-mb"]) > 0
    # FedGKT's upload is features, FedAvg's the model: both measured, very different sizes.
    assert float(gkt[1]["bytes-up-train"]) > sum(sizes) * 16 * 28 * 28 * 4  # fp32 feature maps
    assert float(gkt[1]["bytes-down-train"]) == 0  # no server logits before round 2
    assert float(gkt[2]["bytes-down-train"]) > sum(sizes) * 10 * 4
    model_bytes = record_nbytes(
        {"arrays": ArrayRecord(build_full_model("resnet10", 10, 1).state_dict())}
    )
    for row in avg.values():  # FedAvg ships the full model (ResNet-11) to and from both nodes
        assert float(row["bytes-down-train"]) == float(row["bytes-up-train"]) == 2 * model_bytes
    assert (out / "gkt" / "server_model.pt").is_file() and (
        out / "avg" / "fedavg_model.pt"
    ).is_file()


def test_grid_experiment_expands_rows_by_columns_and_tables_them(tmp_path):
    from flwr_gkt.app.experiment import expand_grid, grid_table
    from flwr_gkt.app.report import plot_grid

    grid = {
        "rows": {
            "gkt": {"label": "FedGKT", "algorithm": "fedgkt", "set": {"kd-mode": "both"}},
            "avg": {"label": "FedAvg", "algorithm": "fedavg"},
        },
        "columns": {
            "iid": {"label": "IID", "set": {"partition": "iid"}},
            "dir": {"label": "Dir", "preset": "fmnist-small-noniid", "set": {"kd-mode": "none"}},
        },
    }
    runs = expand_grid(grid)
    assert list(runs) == ["gkt--iid", "avg--iid", "gkt--dir", "avg--dir"]  # column by column
    assert runs["gkt--dir"]["set"] == {"kd-mode": "both"}  # the row's settings win
    assert (
        runs["avg--dir"]["preset"] == "fmnist-small-noniid" and runs["avg--dir"]["row"] == "FedAvg"
    )
    spec = {"grid": grid, "runs": runs}
    cfg = RunConfig(results_dir=str(tmp_path))
    for i, name in enumerate(["gkt--iid", "avg--iid", "gkt--dir"]):
        run_cfg = cfg.with_values({"run-name": name})
        out = tmp_path / name
        out.mkdir()
        write_results(out, run_cfg, _history([0.5, 0.6 + i / 10], [1, 1], [1, 1]), {}, nodes=[])
    with open(tmp_path / "gkt--iid" / "nodes.csv", "w") as f:
        f.write("round,stage,node-id,status\n1,train,5,rejected\n1,train,6,accepted\n")
    done = find_runs([tmp_path])
    table = grid_table(spec, done)
    assert "| FedGKT | 60.00 (60.00), 1 rejected | 80.00 (80.00) |" in table
    assert "| FedAvg | 70.00 (70.00) | (not run) |" in table
    cells = [(runs[r.path.name]["row"], runs[r.path.name]["column"], r) for r in done]
    plot_grid(cells, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000
