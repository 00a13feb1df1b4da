"""TensorBoard event files of a run: every round's metrics and node table.

:class:`TensorBoardWriter` is a plain round callback (see
:data:`flwr_gkt.flower.strategy_utils.RoundCallback`): the strategies call it
once per completed round with the round's history row -- the row that also
becomes a line of ``metrics.csv`` -- and the round's node-history records. It
writes

* every numeric value of the row as a scalar at step = the server round,
  tagged by :func:`scalar_tag` (``evaluate/accuracy``, ``train/server-loss``,
  ``bytes/up-train``, ``time/round-seconds``, ...);
* the round's node records as a Markdown table (text tag ``nodes``): each
  node's stage, status (``accepted``, ``rejected``, ``lost``, ``error``,
  ``late``, ...) and reason;
* once, the run's config as a table (text tag ``config``, step 0).

Each round is flushed at once, so ``tensorboard --logdir DIR`` follows a run
while it goes on. TensorBoard stores scalars as 32-bit floats: byte counts
above 16 MiB are rounded by a few bytes.

TensorBoard is optional (``pip install flwr-gkt[tensorboard]``): this module
imports it only when a writer is made, and making one without it raises
:class:`ImportError` naming the extra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO
from pathlib import Path
from types import TracebackType
from typing import Any

from flwr.supercore import log

__all__ = [
    "INSTALL_HINT",
    "TensorBoardWriter",
    "node_table",
    "open_tensorboard",
    "scalar_tag",
]

#: How to get the optional dependency (the message of the ImportError).
INSTALL_HINT = (
    "tensorboard-dir needs the tensorboard package, an optional extra of flwr-gkt: "
    "pip install flwr-gkt[tensorboard] (from a checkout: pip install -e .[tensorboard])"
)

#: Evaluation keys of the history rows that carry no ``eval`` in their name.
_EVALUATE_KEYS = frozenset({"accuracy", "loss", "edge-accuracy", "edge-loss", "num-examples"})
#: Key prefixes that name their own group (``nodes-lost`` -> ``nodes/lost``).
_GROUPS = ("bytes", "nodes", "replies", "store", "staleness", "server")
#: Order of the statuses in a node table's summary line (others follow as they come).
_STATUS_ORDER = (
    "accepted",
    "rejected",
    "error",
    "stale",
    "lost",
    "late",
    "duplicate",
    "evicted",
    "dropped",
)
#: Node-record columns shown after stage, node and status when a record has them.
_NODE_COLUMNS = ("num-examples", "bytes-up", "staleness")


def scalar_tag(key: str) -> str | None:
    """Return the TensorBoard tag of a history-row key (``None``: not a scalar).

    In order of precedence: ``round`` is the step, not a scalar; ``bytes-X``
    -> ``bytes/X``; a key with a ``seconds`` part -> ``time/<key>``; a key
    with a ``train`` part -> ``train/<key without it>``; ``eval-X`` and the
    evaluation metrics -> ``evaluate/...``; ``nodes-``, ``replies-``,
    ``store-``, ``staleness-``, ``server-`` -> that group; anything else
    ``metrics/<key>``.

    Parameters
    ----------
    key : str
        A key of a strategy's history row, e.g. ``server-train-loss``.

    Returns
    -------
    str | None
        For example ``train/server-loss``, ``evaluate/accuracy``,
        ``bytes/up-train``, ``time/round-seconds``, ``nodes/lost``.
    """
    parts = key.split("-")
    if key == "round":
        return None
    if parts[0] == "bytes" and len(parts) > 1:
        return "bytes/" + "-".join(parts[1:])
    if "seconds" in parts:
        return f"time/{key}"
    if "train" in parts and len(parts) > 1:
        return "train/" + "-".join(p for p in parts if p != "train")
    if parts[0] == "eval" and len(parts) > 1:
        return "evaluate/" + "-".join(parts[1:])
    if key in _EVALUATE_KEYS:
        return f"evaluate/{key}"
    if parts[0] in _GROUPS and len(parts) > 1:
        return f"{parts[0]}/" + "-".join(parts[1:])
    return f"metrics/{key}"


def _cell(value: Any) -> str:
    """Return a value as a Markdown table cell (no pipes or line breaks)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def node_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Return a round's node records as a Markdown table, with a summary line.

    Parameters
    ----------
    records : Sequence[Mapping[str, Any]]
        The round's node-history records (``stage``, ``node-id`` or the
        FedAgg ``node`` uid, ``status``, ``reason``, ...).

    Returns
    -------
    str
        For example ``"train: 2 accepted; evaluate: 1 accepted, 1 lost"``
        followed by a table ``stage | node | status | reason`` (plus
        ``num-examples``, ``bytes-up`` and ``staleness`` when a record has
        them); ``"no node records"`` when there are none.
    """
    if not records:
        return "no node records"
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        stage = counts.setdefault(str(r.get("stage", "")), {})
        status = str(r.get("status", ""))
        stage[status] = stage.get(status, 0) + 1

    def order(status: str) -> int:
        return _STATUS_ORDER.index(status) if status in _STATUS_ORDER else len(_STATUS_ORDER)

    summary = "; ".join(
        f"{stage}: "
        + ", ".join(f"{by_status[s]} {s}" for s in sorted(by_status, key=order))  # stable sort
        for stage, by_status in counts.items()
    )
    extra = [c for c in _NODE_COLUMNS if any(c in r for r in records)]
    header = ["stage", "node", "status", *extra, "reason"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in records:
        node = r.get("node") or r.get("node-id", "")
        cells = [r.get("stage", ""), node, r.get("status", "")]
        cells += [r.get(c, "") for c in extra] + [r.get("reason", "")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return summary + "\n\n" + "\n".join(lines)


def _summary_writer() -> Any:
    """Return ``torch.utils.tensorboard.SummaryWriter``; ImportError with the hint without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch raises it when the tensorboard package is missing
        raise ImportError(INSTALL_HINT) from error
    return SummaryWriter


class TensorBoardWriter:
    """Write each completed round's metrics and node table to TensorBoard.

    A :data:`~flwr_gkt.flower.strategy_utils.RoundCallback`: pass it as a
    strategy's ``on_round``. Use it as a context manager, or :meth:`close` it.

    Parameters
    ----------
    log_dir : str or Path
        Directory of the event files (made if missing).
    config : Mapping[str, Any], optional
        The run's settings, written once as a table (text tag ``config``).

    Raises
    ------
    ImportError
        If the ``tensorboard`` package is not installed (the message names the
        ``flwr-gkt[tensorboard]`` extra).
    """

    def __init__(self, log_dir: str | Path, config: Mapping[str, Any] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.writer = _summary_writer()(log_dir=str(self.log_dir))
        if config:
            rows = [f"| {_cell(k)} | {_cell(v)} |" for k, v in config.items()]
            self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + "\n".join(rows), 0)
            self.writer.flush()

    def __call__(self, row: Mapping[str, float], nodes: Sequence[Mapping[str, Any]] = ()) -> None:
        """Write one round: its numeric values as scalars, its node records as text.

        Parameters
        ----------
        row : Mapping[str, float]
            The round's history row; ``row["round"]`` is the step. Values that
            are not numbers are skipped.
        nodes : Sequence[Mapping[str, Any]]
            The round's node records (:func:`node_table`); none: no table.
        """
        step = int(row["round"])
        for key, value in row.items():
            tag = scalar_tag(key)
            if tag is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self.writer.add_scalar(tag, float(value), step)
        if nodes:
            self.writer.add_text("nodes", node_table(nodes), step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_tensorboard(
    tensorboard_dir: str, run_name: str, config: Mapping[str, Any] | None = None
) -> TensorBoardWriter | None:
    """Return the run's writer into ``<tensorboard_dir>/<run_name>``; ``None`` without a directory.

    Parameters
    ----------
    tensorboard_dir : str
        The ``tensorboard-dir`` setting (``""``: no TensorBoard); ``~`` is
        expanded and a relative path is taken from the working directory, as
        ``results-dir`` is.
    run_name : str
        The run's folder name (that of its results directory), so that
        ``tensorboard --logdir <tensorboard-dir>`` lists the runs side by side.
    config : Mapping[str, Any], optional
        The run's settings (see :class:`TensorBoardWriter`).

    Returns
    -------
    TensorBoardWriter | None
        The writer, or ``None`` when ``tensorboard_dir`` is empty.

    Raises
    ------
    ImportError
        If a directory is set and the ``tensorboard`` package is not installed.
    """
    if not tensorboard_dir:
        return None
    path = Path(tensorboard_dir).expanduser() / run_name
    writer = TensorBoardWriter(path, config)
    log(INFO, "TensorBoard: every round goes to %s (tensorboard --logdir %s)", path, path.parent)
    return writer
