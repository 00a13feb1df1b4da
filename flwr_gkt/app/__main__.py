"""Python entry: ``python -m simulation --preset fmnist [--set key=value ...]``.

Resolves the config (preset <- overrides) and runs the app the way Flower
recommends: ``flwr run`` on a local simulation SuperLink (Ray backend), here a
private one that this command starts and stops (:mod:`flwr_gkt.app.flwr_local`),
with the resolved config as the app's run config. ``--runtime inprocess`` runs
the same apps in this process instead, with no Ray and no SuperLink
(:mod:`flwr_gkt.app.inprocess`: nodes handled one at a time, deterministic node ids).
``--cpu`` prints the CPU, the GPU and whether ``precision: auto`` trains in bf16
there, and exits.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flwr_gkt.config import RunConfig, add_override_argument, parse_overrides, resolve_config

from .centralized import run_centralized
from .client_app import make_client_app
from .fedagg_app import make_fedagg_apps
from .fedavg_app import make_fedavg_apps
from .flwr_local import run_config_app
from .hardware import hardware_report
from .inprocess import run_inprocess
from .legacy_app import make_legacy_apps
from .server_app import make_server_app
from .split_app import make_split_apps
from .task import PRESETS_DIR, prepare_extractor

#: ``--algorithm`` values of the split-learning baselines (``split-mode``).
SPLIT_ALGORITHMS = ("sl", "splitfed-v1", "splitfed-v2")


class _HardwareAction(argparse.Action):
    """``--cpu``: print :func:`hardware_report` and exit, as ``--version`` does."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(hardware_report(), flush=True)
        parser.exit()


def build_config(argv: list[str] | None = None) -> tuple[RunConfig, str, str]:
    """The resolved config, the API (``message``, ``legacy``, ``fedavg``, ``fedagg``,
    ``split`` or ``centralized``) and the runtime."""
    parser = argparse.ArgumentParser(
        prog="python -m simulation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default="fmnist",
        help="preset name in flwr_gkt/app/presets/ or a path to a YAML file",
    )
    add_override_argument(parser)
    parser.add_argument(
        "--cpu",
        action=_HardwareAction,
        help="print the CPU (model, cores, bf16 support), the GPU and the precision "
        "'precision: auto' trains in, then exit",
    )
    parser.add_argument(
        "--api",
        choices=("message", "legacy"),
        default="message",
        help="Flower API: the Message API strategy (default) or the legacy "
        "configure_fit/aggregate_fit adapter with a NumPyClient",
    )
    parser.add_argument(
        "--algorithm",
        choices=("fedgkt", "fedavg", "fedagg", "centralized", *SPLIT_ALGORITHMS),
        default="fedgkt",
        help="FedGKT (default), the FedAvg baseline (Flower's FedAvg training the full "
        "model, edge stem + server body, on the same partitions), FedAgg "
        "(end-edge-cloud tree: num-clients end devices under fedagg-edges edges) or "
        "the centralized baseline (centralized-model full or edge on the pooled partitions); "
        "sl, splitfed-v1, splitfed-v2: the split-learning baselines (edge extractor and "
        "server model of FedGKT, activations and gradients every mini-batch)",
    )
    parser.add_argument(
        "--runtime",
        choices=("flwr", "inprocess"),
        default="flwr",
        help="flwr run on a private local simulation SuperLink (default; Flower's Ray "
        "simulation) or an in-process grid running the ClientApp in this process, one "
        "node at a time (no Ray)",
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.algorithm in SPLIT_ALGORITHMS:
        overrides["split-mode"] = args.algorithm
    if args.runtime == "inprocess":  # nodes run one at a time here: each may use every core
        overrides.setdefault("client-threads", 0)
    cfg = resolve_config({"preset": args.preset, **overrides}, PRESETS_DIR)
    api = args.algorithm if args.algorithm != "fedgkt" else args.api
    api = "split" if api in SPLIT_ALGORITHMS else api
    return cfg, api, args.runtime


def main(argv: list[str] | None = None) -> int:
    cfg, api, runtime = build_config(argv)
    if api != "fedagg":
        cfg = prepare_extractor(cfg)  # extractor-init held-out / pooled: the weights file
    if api == "centralized":
        print(
            f"flwr-gkt centralized baseline: {cfg.centralized_model} model, "
            f"{cfg.num_server_rounds} x {cfg.edge_epochs} epochs",
            flush=True,
        )
        run_centralized(cfg)
        return 0
    print(
        f"flwr-gkt simulation ({api}, {runtime}): {cfg.num_clients} nodes, {cfg.num_server_rounds} "
        f"rounds, edge {cfg.edge_models or cfg.edge_model}, server {cfg.server_model}",
        flush=True,
    )
    num_nodes = cfg.num_clients + (cfg.fedagg_edges if api == "fedagg" else 0)
    if runtime == "flwr":
        return run_config_app(cfg, api, num_nodes)
    if api == "fedavg":
        server_app, client_app = make_fedavg_apps(cfg)
    elif api == "fedagg":
        server_app, client_app = make_fedagg_apps(cfg)
    elif api == "split":
        server_app, client_app = make_split_apps(cfg)
    elif api == "legacy":
        server_app, client_app = make_legacy_apps(cfg)
    else:
        server_app, client_app = make_server_app(cfg), make_client_app(cfg)
    run_inprocess(server_app, client_app, num_nodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
