"""One trust boundary -- nothing a node sends crashes, spoofs or stalls the server."""

import csv
import logging
import os
import pickle
import stat
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_gkt.config import RunConfig
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.store import FeatureStore
from flwr_gkt.data.sources.cifar import CifarUnpickler, extract_tar
from flwr_gkt.flower.async_strategy import AsyncFedGKT
from flwr_gkt.flower.base import RoundLog
from flwr_gkt.flower.client_app import STATE_LOGITS, handle_query, handle_train, save_state
from flwr_gkt.flower.options import SamplingOptions, TrustOptions, WireOptions
from flwr_gkt.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NODE_KEY,
    NODE_TOKEN,
    NODE_UID,
    Payload,
    encode_payload,
    encode_server_logits,
    metrics_record,
)
from flwr_gkt.wire.gate import ReplyGate, clean_text, clean_uid, content_nbytes
from tests.helpers.federation import FakeGrid
from tests.helpers.gkt import (
    NODES,
    SHAPE,
    N,
    honest,
    make_strategy,
    reply_to,
    statuses,
    train_round,
)
from tests.helpers.gkt import ClientProxy as _Proxy
from tests.helpers.gkt import legacy_fit as _legacy_fit
from tests.helpers.gkt import legacy_strategy as _legacy

FUZZ = {"replies": 0}


def _metrics_reply(instruction, metrics: dict, node_info: dict | None = None, rnd=1):
    f, y, z = honest(instruction.metadata.dst_node_id, rnd)
    content = RecordDict({ARRAYS_KEY: encode_payload(f, y, z), METRICS_KEY: metrics_record(len(y))})
    for key, value in metrics.items():
        content[METRICS_KEY][key] = value
    if node_info is not None:
        content[NODE_KEY] = ConfigRecord(node_info)
    return Message(content, reply_to=instruction)


def _round(strategy, rnd, replace=None, nodes=NODES):
    """A train round where ``replace(node, instruction)`` may return a node's own reply."""
    instructions = list(
        strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), FakeGrid(nodes))
    )
    replies = []
    for msg in instructions:
        node = msg.metadata.dst_node_id
        mine = replace(node, msg) if replace else None
        replies.append(mine if mine is not None else reply_to(msg, *honest(node, rnd)))
    return strategy.aggregate_train(rnd, replies)


# ------------------------------------------------------------- metric records
@pytest.mark.parametrize(
    "metrics",
    [
        {"status": 1.0, "reason": 2.0},
        {"edge-train-loss": [1.0, 2.0], "edge-train-accuracy": [0.5]},
        {"round": 99.0, "node-id": 7.0, "stage": 3.0},
        {"edge-train-loss": float("nan"), "edge-seconds": float("inf")},
    ],
)
def test_hostile_train_metrics_never_raise_nor_rewrite_the_history(metrics):
    strategy = make_strategy()
    _round(strategy, 1, lambda n, m: _metrics_reply(m, metrics) if n == 22 else None)
    rows = [r for r in strategy.node_history if r["node-id"] == 22]
    assert len(rows) == 1 and rows[0]["round"] == 1 and rows[0]["stage"] == "train"
    assert rows[0]["status"] == "accepted" and rows[0]["metrics-dropped"] == len(metrics)
    assert strategy.history[-1]["nodes-lost"] == 0 and strategy.history[-1]["nodes-replied"] == 4
    assert np.isfinite(strategy.history[-1].get("edge-train-loss", 0.0))


def test_hostile_evaluate_metrics_never_raise():
    strategy = make_strategy()
    _round(strategy, 1)
    instructions = list(
        strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), FakeGrid(NODES))
    )
    replies = []
    for msg in instructions:
        node = msg.metadata.dst_node_id
        f, y, _ = honest(node, 9)
        content = RecordDict(
            {ARRAYS_KEY: encode_payload(f, y, None), METRICS_KEY: metrics_record(len(y))}
        )
        if node == 33:
            content[METRICS_KEY]["edge-accuracy"] = [0.1, 0.2]
            content[METRICS_KEY]["status"] = 5.0
        replies.append(Message(content, reply_to=msg))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and metrics["eval-nodes"] == 4
    rows = [r for r in strategy.node_history if r["stage"] == "evaluate"]
    assert {r["status"] for r in rows} == {"accepted"}


def test_error_reasons_and_uids_are_escaped_in_logs_and_nodes_csv(tmp_path, caplog):
    strategy = make_strategy()
    evil = "boom\nWARNING : forged line,=cmd()"

    def replace(node, msg):
        if node == 11:
            return Message(Error(code=0, reason=evil), reply_to=msg)
        if node == 22:
            return _metrics_reply(msg, {}, {NODE_UID: "a,b\nc"})
        return None

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, replace)
    assert "forged line" in caplog.text and "boom\nWARNING" not in caplog.text
    got = statuses(strategy, 1)
    assert got[11][0] == "error" and "\\n" in got[11][1]
    assert got[22][0] == "rejected" and "invalid node-uid" in got[22][1]
    assert clean_text("=1+1") == "'=1+1" and clean_uid("edge,0") is None
    from flwr_gkt.app.task import _write_csv

    _write_csv(tmp_path / "nodes.csv", strategy.node_history)
    with open(tmp_path / "nodes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all("\n" not in r["reason"] for r in rows)


# ------------------------------------------------------------- size limits
def test_size_limit_counts_config_and_metric_records_too():
    nbytes = sum(len(a.data) for a in encode_payload(*honest(11, 1)).values())
    strategy = make_strategy(wire=WireOptions(max_payload_bytes=nbytes + 10_000))
    _round(
        strategy,
        1,
        lambda n, m: _metrics_reply(m, {}, {NODE_UID: "x" * 50_000}) if n == 33 else None,
    )
    got = statuses(strategy, 1)
    assert got[33][0] == "rejected" and "over the limit" in got[33][1]
    assert all(got[n][0] == "accepted" for n in (11, 22, 44))
    content = RecordDict({CONFIG_KEY: ConfigRecord({"k": "v" * 100, "l": [1, 2, 3]})})
    assert content_nbytes(content) >= 100 + 24


# ------------------------------------------------------------- poisoning
def _poison(f, y, z, value=3e38):
    f = f.clone()
    f[: max(1, len(f) // 6)] = value  # a minority of samples
    f[1 : max(2, len(f) // 6) : 2] *= -1
    return f, y, z


@pytest.mark.parametrize(
    ("value", "rule"),
    [(3e38, "holds values beyond +-10000"), (1e3, "feature-norm-max")],
)
def test_a_minority_of_extreme_samples_is_caught_by_the_gate(value, rule):
    """Beyond the magnitude bound, or within it but 1000x the honest population's scale."""
    strategy = make_strategy()
    poison = lambda n, f, y, z: _poison(f, y, z, value) if n == 44 else (f, y, z)  # noqa: E731
    train_round(strategy, 1, poison)
    got = statuses(strategy, 1)
    assert got[44][0] == "rejected" and rule in got[44][1]
    assert 44 not in strategy.server.store and np.isfinite(
        strategy.history[-1]["server-train-loss"]
    )


def test_the_training_guard_evicts_the_poisoned_payload_and_trains_without_it(caplog):
    strategy = make_strategy(
        nodes=[11, 22], trust=TrustOptions(outlier_threshold=0.0)
    )  # nothing to compare with
    strategy.gate.max_abs_value = 0  # the magnitude rule off too: the guard behind the gate
    train_round(strategy, 1, nodes=[11, 22])
    before = {k: v.clone() for k, v in strategy.server.model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        train_round(
            strategy,
            2,
            lambda n, f, y, z: _poison(f, y, z) if n == 22 else (f, y, z),
            nodes=[11, 22],
        )
    assert "payload of node 22 evicted" in caplog.text
    assert 22 not in strategy.server.store and 11 in strategy.server.store
    row = strategy.history[-1]
    assert row["nodes-evicted"] == 1 and np.isfinite(row["server-train-loss"])
    assert any(not torch.equal(v, before[k]) for k, v in strategy.server.model.state_dict().items())
    assert statuses(strategy, 2)[22][0] == "evicted"


def test_poisoning_every_round_does_not_stop_the_federation_learning():
    """End to end: in-process ClientApps, one node poisons a minority of its samples every round."""
    from flwr_gkt.core.edge import EdgeRoundConfig
    from flwr_gkt.core.models import resnet8
    from flwr_gkt.core.registry import build_server_model
    from flwr_gkt.data import client_data
    from flwr_gkt.flower.strategy import FedGKT
    from tests.helpers.federation import LocalFederation, seeded_builders

    def poison(node, rnd, reply):
        if (
            node == 33
            and reply.metadata.message_type == MessageType.TRAIN
            and not reply.has_error()
        ):
            record = reply.content.array_records[ARRAYS_KEY]
            f = record["features"].numpy().copy()
            f[: len(f) // 5] = 3e38
            from flwr.app import Array

            record["features"] = Array(f)
        return reply

    datas = [client_data(i, 4, fraction=0.01, test_fraction=0.03) for i in range(4)]
    nodes = [11, 22, 33, 44]
    fed = LocalFederation(nodes, datas, seeded_builders(lambda: resnet8(10, 1), 4))
    fed.tamper = poison
    torch.manual_seed(0)
    server = GKTServer(build_server_model("resnet10", 10), epochs=1, batch_size=32, device="cpu")
    strategy = FedGKT(
        server,
        10,
        feature_shape=(16, 28, 28),
        edge_config=EdgeRoundConfig(batch_size=32),
        sampling=SamplingOptions(min_available_nodes=4),
    )
    accuracies = [fed.run_round(strategy, rnd)[1]["accuracy"] for rnd in (1, 2, 3)]
    assert accuracies[-1] > accuracies[0] and accuracies[-1] > 0.3
    assert all(statuses(strategy, r)[33][0] == "rejected" for r in (1, 2, 3))


# ------------------------------------------------------------- async
def test_async_compares_a_lone_reply_with_the_stored_payloads_and_drops_leave_the_store():
    torch.manual_seed(0)
    from tests.helpers.gkt import tiny_server_model

    server = GKTServer(tiny_server_model(), epochs=1, batch_size=16, device="cpu")
    strategy = AsyncFedGKT(
        server, 10, feature_shape=SHAPE, sampling=SamplingOptions(min_available_nodes=1)
    )
    for rnd, node in enumerate(NODES[:3], 1):  # three honest payloads stored one at a time
        msg = strategy.train_instruction(node, rnd, ConfigRecord())
        strategy._accept(
            rnd,
            "train",
            [reply_to(msg, *honest(node, rnd))],
            [msg],
            lambda n, p, m, r=rnd: strategy._store(n, p, r),
        )
    msg = strategy.train_instruction(44, 4, ConfigRecord())
    f, y, z = honest(44, 4)
    accepted, _, rejected = strategy._accept(4, "train", [reply_to(msg, f * 1000, y, z)], [msg])
    assert rejected == 1 and not accepted
    strategy.forget_node(11)
    assert 11 not in strategy.server.store and 11 not in strategy.gate.reference


# ------------------------------------------------------------- identity
def test_first_claim_of_a_uid_wins_and_conflicts_are_rejected():
    strategy = make_strategy()
    _round(strategy, 1, lambda n, m: _metrics_reply(m, {}, {NODE_UID: f"dev-{n}"}))
    _round(
        strategy,
        2,
        lambda n, m: _metrics_reply(m, {}, {NODE_UID: "dev-11"}, 2) if n == 22 else None,
    )
    got = statuses(strategy, 2)
    assert got[22][0] == "rejected" and "belongs to node 11" in got[22][1]
    assert strategy.nodes.uids[11] == "dev-11" and strategy.nodes.uids[22] == "dev-22"


def test_resume_hands_server_logits_only_to_the_node_holding_its_token():
    strategy = make_strategy()
    _round(strategy, 1, lambda n, m: _metrics_reply(m, {}, {NODE_UID: f"dev-{n}"}))
    tokens = {
        m.metadata.dst_node_id: m.content[CONFIG_KEY][NODE_TOKEN] for m in strategy._sent_train
    }
    assert len(set(tokens.values())) == 4
    state = strategy.state_dict()
    resumed = make_strategy()
    resumed.load_state_dict(state)

    class QueryGrid(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            out = []
            for m in messages:
                new = m.metadata.dst_node_id
                old = new - 100
                info = {NODE_UID: f"dev-{old}"}
                if old != 44:  # node 144 claims dev-44 without its token (a spoof)
                    info[NODE_TOKEN] = tokens[old]
                out.append(Message(RecordDict({NODE_KEY: ConfigRecord(info)}), reply_to=m))
            return out

    moved = resumed.reidentify_nodes(QueryGrid([111, 122, 133, 144]))
    assert moved == {11: 111, 22: 122, 33: 133}
    assert (
        resumed.server.server_logits(144) is None and resumed.server.server_logits(111) is not None
    )


def test_majority_fixes_the_feature_shape_not_the_first_reply():
    strategy = make_strategy()
    strategy.spec = strategy.spec.__class__(10, None, None)

    def first_hostile(node, msg):
        if node == 11:
            return reply_to(msg, torch.rand(N, 1, 1, 1), *honest(11, 1)[1:])
        return None

    _round(strategy, 1, first_hostile)
    assert strategy.spec.feature_shape == SHAPE
    got = statuses(strategy, 1)
    assert got[11][0] == "rejected" and all(got[n][0] == "accepted" for n in (22, 33, 44))


# ------------------------------------------------------------- FedAgg topology
def test_fedagg_rejects_self_parents_cycles_duplicates_and_goes_on():
    from flwr_gkt.flower.fedagg_client import TierRole
    from flwr_gkt.flower.fedagg_strategy import _Tree

    roles = {
        "edge-0": (1, TierRole("edge-0", "edge", "cloud")),
        "edge-1": (2, TierRole("edge-1", "edge", "edge-1")),  # its own parent
        "edge-2": (3, TierRole("edge-2", "edge", "edge-3")),  # edge-2 <-> edge-3
        "edge-3": (4, TierRole("edge-3", "edge", "edge-2")),
        "end-0": (5, TierRole("end-0", "end", "edge-0")),
        "end-1": (6, TierRole("end-1", "end", "edge-2")),  # under the cycle
        "end-2": (7, TierRole("end-2", "end", "ghost")),
    }
    tree = _Tree(roles, {"end-0", "end-1", "end-2"})
    assert tree.members == ["edge-0", "end-0"]
    assert tree.leaves("cloud") == ["end-0"]


def test_fedagg_topology_query_binds_uids_to_the_first_node():
    from flwr_gkt.flower.fedagg_strategy import FedAgg

    agg = FedAgg.__new__(FedAgg)
    agg.gate, agg.migrations, agg.parents, agg.moves = ReplyGate(name="FedAgg"), [], {}, []

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

        def send_and_receive(self, messages, timeout=None):
            answers = {
                1: {NODE_UID: "edge-0", "tier": "edge", "parent": "cloud"},
                2: {NODE_UID: "edge-0", "tier": "edge", "parent": "cloud"},  # a second claim
                3: {NODE_UID: "end,0", "tier": "end", "parent": "edge-0"},  # a comma
            }
            out = []
            for m in messages:
                info = ConfigRecord(answers[m.metadata.dst_node_id])
                out.append(Message(RecordDict({NODE_KEY: info}), reply_to=m))
            return out

    roles = agg._topology(Grid(), 1, 1.0)
    assert list(roles) == ["edge-0"] and roles["edge-0"][0] == 1


# ------------------------------------------------------------- node-side authority
def test_a_deployed_node_takes_its_own_settings_not_the_servers(tmp_path):
    from flwr_gkt.app.task import node_setup

    cfg = RunConfig(
        node_state_dir=str(tmp_path / "evil"),
        privacy_clip=0.0,
        edge_pretrained="/etc/x",
        data_dir="/x",
    )
    mine = {"privacy-clip": 5.0, "privacy-noise": 0.1, "state-dir": str(tmp_path / "mine")}
    node = node_setup(cfg, mine)
    assert node.state_dir == str(tmp_path / "mine") and node.cfg.edge_pretrained == ""
    assert node.cfg.data_dir == "" and node.privacy is not None and node.privacy.clip == 5.0
    server_says = RunConfig(privacy_clip=0.0, privacy_noise=0.0)
    assert node_setup(server_says, {"privacy-clip": 5.0, "privacy-noise": 0.1}).privacy.noise == 0.1
    assert node_setup(cfg, {}).state_dir == ""  # the server cannot choose where a node writes
    assert node_setup(cfg, {}, trusted=True).state_dir.startswith(str(tmp_path / "evil"))


# ------------------------------------------------------------- files and secrets
def test_cifar_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Evil()}))
    with open(path, "rb") as f, pytest.raises(pickle.UnpicklingError, match="refused"):
        CifarUnpickler(f, encoding="latin1").load()
    assert not (tmp_path / "pwned").exists()
    good = tmp_path / "ok"
    good.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}))
    with open(good, "rb") as f:
        assert CifarUnpickler(f, encoding="latin1").load()["labels"] == [1, 2]


@pytest.mark.parametrize("filters", [True, False], ids=["tarfile-filters", "python-before-3.11.4"])
def test_archives_cannot_write_outside_the_data_dir(tmp_path, monkeypatch, filters):
    if not filters:  # Debian 12's Python 3.11.2 has no tarfile.data_filter
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    evil = tmp_path / "evil.tar.gz"
    (tmp_path / "payload").write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(tmp_path / "payload", arcname="../../escaped")
    (tmp_path / "data").mkdir()
    with pytest.raises(tarfile.TarError):
        extract_tar(evil, tmp_path / "data")
    assert not (tmp_path.parent / "escaped").exists()


def test_key_scripts_keep_private_keys_private_and_the_ca_key_apart(tmp_path):
    deploy = Path(__file__).parents[2] / "deploy"
    subprocess.run(
        ["bash", str(deploy / "gen_certs.sh"), str(tmp_path / "certs")],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == [
        "ca.crt",
        "server.key",
        "server.pem",
    ]
    ca_key = tmp_path / "ca-private" / "ca.key"
    assert ca_key.is_file()
    for key in (ca_key, tmp_path / "certs" / "server.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca-private").stat().st_mode) == 0o700


def test_spill_files_are_private_and_a_failed_write_keeps_the_old_payload(tmp_path, monkeypatch):
    store = FeatureStore(memory_budget=1, spill_dir=tmp_path / "spill")
    f, y, z = honest(11, 1)
    store.put(11, Payload(f, y, z))
    (spilled,) = list((tmp_path / "spill").iterdir())
    assert stat.S_IMODE(spilled.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "spill").stat().st_mode) == 0o700

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", full_disk)
    with pytest.raises(OSError):
        store.put(11, Payload(f * 2, y, z))
    torch.testing.assert_close(store[11].features, f)  # the previous payload is still there
    assert len(list((tmp_path / "spill").iterdir())) == 1
    store.close()


def test_a_crashed_run_leaves_no_spill_files_behind(tmp_path, monkeypatch):
    """Spill files are removed in ``finally``, and a crashed run's are cleaned at the next start."""
    from flwr_gkt.app.server_app import run_fedgkt
    from flwr_gkt.app.task import config_from_run_config
    from flwr_gkt.flower.strategy import FedGKT

    cfg = config_from_run_config(
        {
            "preset": "smoke",
            "results-dir": str(tmp_path),
            "run-name": "r",
            "memory-budget-mb": 0.001,
        }
    )
    stale = tmp_path / "r" / "spill"
    stale.mkdir(parents=True)
    (stale / "node-7-v1.npy").write_bytes(b"an earlier run's features")
    seen = {}

    def crash(self, *args, **kwargs):
        y = honest(11, 1)[1]
        seen["stale-left"] = (stale / "node-7-v1.npy").exists()
        self.server.store.put(11, Payload(torch.rand(N, 16, 28, 28), y, torch.randn(N, 10)))
        seen["spilled"] = len(list(stale.glob("*.npy")))
        raise RuntimeError("the ServerApp dies mid-run")

    monkeypatch.setattr(FedGKT, "start", crash)
    with pytest.raises(RuntimeError, match="dies mid-run"):
        run_fedgkt(FakeGrid([1, 2]), cfg)
    assert seen == {"stale-left": False, "spilled": 1}
    assert not list(stale.glob("*.npy")) if stale.exists() else True


def test_the_node_keeps_only_validated_server_logits_and_writes_state_atomically(tmp_path):
    from flwr_gkt.core.models import resnet8
    from flwr_gkt.data import client_data

    data = client_data(0, 2, fraction=0.005, test_fraction=0.01)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    record = encode_server_logits(torch.randn(len(data.y_train), 10))
    record["extra"] = record["server-logits"]  # something else the server slipped in
    msg = Message(
        RecordDict(
            {CONFIG_KEY: ConfigRecord({"batch-size": 32, NODE_TOKEN: "t0k"}), ARRAYS_KEY: record}
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    handle_train(msg, context, data, lambda: resnet8(10, 1), "cpu", state_dir=tmp_path)
    assert list(context.state.array_records[STATE_LOGITS].keys()) == ["server-logits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gkt-node-state.pt"]  # no tmp left
    save_state(context, tmp_path, 2)
    assert not list(tmp_path.glob("*.tmp"))
    fresh = Context(run_id=2, node_id=9, node_config={}, state=RecordDict(), run_config={})
    query = Message(
        RecordDict({CONFIG_KEY: ConfigRecord({"query": NODE_UID})}),
        dst_node_id=9,
        message_type=MessageType.QUERY,
    )
    info = handle_query(query, fresh, "dev-0", tmp_path).content[NODE_KEY]
    assert info[NODE_TOKEN] == "t0k"


# ------------------------------------------------------------- whole-message fuzzing
_values = st.one_of(
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=300),
    st.lists(st.floats(allow_nan=True), max_size=5),
    st.lists(st.integers(-5, 5), max_size=5),
    st.binary(max_size=50),
)
_keys = st.one_of(
    st.sampled_from(
        [
            "num-examples",
            "status",
            "reason",
            "round",
            "node-id",
            "stage",
            "bytes-up",
            "edge-train-loss",
            "edge-accuracy",
            "edge-loss",
            "node-uid",
            "node-token",
            "accepted",
        ]
    ),
    st.text(min_size=1, max_size=40),
)


@st.composite
def hostile_records(draw):
    metrics = draw(st.dictionaries(_keys, _values, max_size=6))
    node = draw(st.dictionaries(_keys, _values, max_size=4))
    uid = draw(st.one_of(st.none(), st.text(max_size=200), st.integers()))
    if uid is not None:
        node[NODE_UID] = uid
    return metrics, node


def _records(metrics, node):
    from flwr.app import MetricRecord

    ok_metrics = {}
    for k, v in metrics.items():
        try:
            MetricRecord({k: v})
            ok_metrics[k] = v
        except Exception:
            pass
    ok_node = {}
    for k, v in node.items():
        try:
            ConfigRecord({k: v})
            ok_node[k] = v
        except Exception:
            pass
    return ok_metrics, ok_node


FUZZ_SYNC = make_strategy()


@settings(
    max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(hostile_records(), st.booleans())
def test_fuzz_fedgkt_train_and_evaluate_replies(records, evaluate):
    metrics, node = _records(*records)
    strategy = FUZZ_SYNC
    strategy.server.epochs = 0
    rnd = len(strategy.history) + 1
    before = [dict(r) for r in strategy.node_history]

    def hostile(msg, payload_logits=True):
        f, y, z = honest(11, rnd)
        content = RecordDict(
            {
                ARRAYS_KEY: encode_payload(f, y, z if payload_logits else None),
                METRICS_KEY: metrics_record(len(y)),
            }
        )
        for k, v in metrics.items():
            content[METRICS_KEY][k] = v
        content[NODE_KEY] = ConfigRecord(node) if node else ConfigRecord()
        return Message(content, reply_to=msg)

    _round(strategy, rnd, lambda n, m: hostile(m) if n == 11 else None)
    FUZZ["replies"] += 1
    if evaluate:
        instructions = list(
            strategy.configure_evaluate(rnd, ArrayRecord(), ConfigRecord(), FakeGrid(NODES))
        )
        replies = []
        for m in instructions:
            if m.metadata.dst_node_id == 11:
                replies.append(hostile(m, False))
            else:
                f, y, _ = honest(m.metadata.dst_node_id, rnd)
                replies.append(
                    Message(
                        RecordDict(
                            {
                                ARRAYS_KEY: encode_payload(f, y, None),
                                METRICS_KEY: metrics_record(len(y)),
                            }
                        ),
                        reply_to=m,
                    )
                )
        strategy.aggregate_evaluate(rnd, replies)
        FUZZ["replies"] += 1
    assert strategy.node_history[: len(before)] == before  # no history row rewritten
    got = statuses(strategy, rnd)
    assert all(got[n][0] == "accepted" for n in (22, 33, 44))


@settings(
    max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(hostile_records())
def test_fuzz_async_replies(records):
    metrics, node = _records(*records)
    strategy = FUZZ_ASYNC
    before = [dict(r) for r in strategy.node_history]
    rnd = len(strategy.node_history) + 1
    msg = strategy.train_instruction(11, rnd, ConfigRecord())
    f, y, z = honest(11, rnd)
    content = RecordDict({ARRAYS_KEY: encode_payload(f, y, z), METRICS_KEY: metrics_record(len(y))})
    for k, v in metrics.items():
        content[METRICS_KEY][k] = v
    content[NODE_KEY] = ConfigRecord(node) if node else ConfigRecord()
    strategy._accept(
        rnd,
        "train",
        [Message(content, reply_to=msg)],
        [msg],
        lambda n, p, m: strategy._store(n, p, rnd),
    )
    FUZZ["replies"] += 1
    assert strategy.node_history[: len(before)] == before


def _async_strategy():
    from tests.helpers.gkt import tiny_server_model

    torch.manual_seed(0)
    server = GKTServer(tiny_server_model(), epochs=0, batch_size=16, device="cpu")
    return AsyncFedGKT(
        server, 10, feature_shape=SHAPE, sampling=SamplingOptions(min_available_nodes=1)
    )


FUZZ_ASYNC = _async_strategy()


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.text(max_size=12), st.integers()),
            st.sampled_from(["edge", "end", "cloud", "x"]),
            st.one_of(st.text(max_size=12), st.sampled_from(["cloud", "e0", "e1", "n0"])),
        ),
        max_size=8,
    )
)
def test_fuzz_fedagg_topologies(claims):
    from flwr_gkt.flower.fedagg_strategy import FedAgg, _Tree

    agg = FedAgg.__new__(FedAgg)
    agg.gate, agg.migrations, agg.parents, agg.moves = ReplyGate(name="FedAgg"), [], {}, []

    class Grid:
        def get_node_ids(self):
            return list(range(1, len(claims) + 1))

        def send_and_receive(self, messages, timeout=None):
            out = []
            for m, (uid, tier, parent) in zip(messages, claims, strict=False):
                info = ConfigRecord({NODE_UID: uid, "tier": tier, "parent": parent})
                out.append(Message(RecordDict({NODE_KEY: info}), reply_to=m))
            return out

    roles = agg._topology(Grid(), 1, 1.0)
    tree = _Tree(roles, set(roles))
    for uid in tree.members:
        tree.leaves(uid)  # terminates: the tree has no cycle
    assert len({nid for nid, _ in roles.values()}) == len(roles)
    FUZZ["replies"] += len(claims)


def test_fedagg_rejects_oversized_replies_and_logs_node_errors_escaped(caplog):
    from flwr_gkt.flower.fedagg_strategy import FedAgg

    agg = FedAgg.__new__(FedAgg)
    agg.gate, agg.rounds = ReplyGate(1000, name="FedAgg"), RoundLog()

    class Grid:
        def send_and_receive(self, messages, timeout=None):
            big, err = messages
            content = RecordDict({CONFIG_KEY: ConfigRecord({"pad": "x" * 5000})})
            return [
                Message(content, reply_to=big),
                Message(Error(code=3, reason="bad\nline"), reply_to=err),
            ]

    msgs = {
        u: Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN)
        for u, n in (("end-0", 1), ("end-1", 2))
    }
    with caplog.at_level(logging.WARNING):
        got = agg._exchange(Grid(), msgs, 1.0, 1, "init")
    assert got == {}
    rows = {r["node"]: r for r in agg.node_history}
    assert rows["end-0"]["status"] == "rejected" and "over the limit" in rows["end-0"]["reason"]
    assert rows["end-1"]["status"] == "error" and "\\n" in rows["end-1"]["reason"]
    assert "bad\nline" not in caplog.text


def test_the_deploy_preset_turns_the_limits_on():
    from flwr_gkt.app.task import config_from_run_config

    cfg = config_from_run_config({"preset": "deploy"})
    assert cfg.max_payload_mb > 0 and cfg.max_samples > 0 and cfg.store_max_age > 0
    assert cfg.node_wait_timeout > 0 and cfg.outlier_threshold > 0


def test_dropped_server_logits_and_failed_identity_replies_are_logged(caplog):
    from flwr_gkt.flower.client_app import _stored_server_logits

    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    context.state.array_records[STATE_LOGITS] = encode_server_logits(torch.randn(5, 10))
    with caplog.at_level(logging.WARNING):
        assert _stored_server_logits(context, 7, 10) is None  # 5 rows for 7 samples
        msg = Message(RecordDict(), dst_node_id=4, message_type=MessageType.QUERY)
        claims = ReplyGate().identities([Message(Error(code=1, reason="down"), reply_to=msg)])
    assert claims == [] and STATE_LOGITS not in context.state.array_records
    assert "kept server logits dropped" in caplog.text
    assert "answered the identity query with an error: down" in caplog.text


# ------------------------------------------------------------- the legacy API through the gate
def _fit_res(node, rnd=1, metrics=None, arrays=None, num_examples=None):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    f, y, z = honest(node, rnd)
    arrays = [f.numpy(), z.numpy(), y.numpy()] if arrays is None else arrays
    n = len(y) if num_examples is None else num_examples
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics or {})


def test_legacy_fit_replies_pass_the_same_gate(caplog):
    from flwr.common import Code, FitRes, Parameters, Status

    strategy = _legacy(wire=WireOptions(max_payload_bytes=200_000))
    f, y, z = honest(66, 1)
    hostile = {
        55: _fit_res(55, metrics={"status": "x", "round": 9.0, "edge-train-loss": b"\x00"}),
        66: _fit_res(66, arrays=[f.numpy(), z.numpy()]),  # two arrays
        77: _fit_res(77, arrays=[(f * float("nan")).numpy(), z.numpy(), y.numpy()]),
        88: _fit_res(88, num_examples=3),  # says 3, carries 12
        99: _fit_res(99, arrays=[np.zeros((400, *SHAPE), np.float32), z.numpy(), y.numpy()]),
        111: FitRes(Status(Code.OK, ""), Parameters([b"not numpy"] * 3, "numpy.ndarray"), 12, {}),
    }
    honest_nodes = [11, 22, 33, 44]
    results = [(_Proxy(n), _fit_res(n)) for n in honest_nodes]
    results += [(_Proxy(n), r) for n, r in hostile.items()]
    failed = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "boom\nforged"), Parameters([], ""), 0, {})
    failures = [(_Proxy(5), failed), RuntimeError("x")]  # the call to node 6 raised
    nodes = [*honest_nodes, *hostile, 5, 6]
    with caplog.at_level(logging.WARNING):
        _, metrics = _legacy_fit(strategy, 1, results, failures, nodes)
    # 55's hostile metrics are dropped, its arrays are fine: accepted
    stored = [n for n in (*honest_nodes, *hostile) if n in strategy.server.store]
    assert stored == [*honest_nodes, 55]
    assert metrics["nodes-replied"] == 5 and metrics["nodes-rejected"] == 7
    assert metrics["server-train-examples"] == 5 * N
    for node in (66, 77, 88, 99, 111, 5, 6):
        assert f"reply of node {node} rejected" in caplog.text
    assert "boom\nforged" not in caplog.text and "over the limit" in caplog.text


def test_legacy_evaluate_replies_pass_the_metric_schema(caplog):
    from flwr.common import Code, EvaluateRes, Status

    strategy = _legacy()
    ok = Status(Code.OK, "")
    results = [
        (_Proxy(1), EvaluateRes(ok, 0.5, 10, {"accuracy": 0.8, "edge-accuracy": 0.6})),
        (_Proxy(2), EvaluateRes(ok, 0.7, 30, {"accuracy": 0.4, "edge-accuracy": "x"})),
        (_Proxy(3), EvaluateRes(ok, float("nan"), 1000, {"accuracy": 1.0})),
        (_Proxy(4), EvaluateRes(ok, 0.1, -5, {"accuracy": 1.0})),
    ]
    with caplog.at_level(logging.WARNING):
        loss, metrics = strategy.aggregate_evaluate(1, results, [])
    assert metrics["num-examples"] == 40
    assert loss == pytest.approx((0.5 * 10 + 0.7 * 30) / 40)
    assert metrics["accuracy"] == pytest.approx((0.8 * 10 + 0.4 * 30) / 40)
    assert metrics["edge-accuracy"] == pytest.approx(0.6 * 10 / 40)  # 2's string is dropped
    assert "reply of node 3 rejected" in caplog.text and "reply of node 4 rejected" in caplog.text


FUZZ_LEGACY = _legacy()


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(
    st.dictionaries(
        _keys, st.one_of(st.integers(), st.floats(), st.booleans(), st.text(), st.binary())
    ),
    st.one_of(st.integers(-5, 20), st.just(N)),
)
def test_fuzz_legacy_fit_replies(metrics, num_examples):
    strategy = FUZZ_LEGACY
    strategy.server.epochs = 0
    rnd = len(strategy.history) + 1
    results = [(_Proxy(n), _fit_res(n, rnd)) for n in (11, 22, 33)]
    results.append((_Proxy(44), _fit_res(44, rnd, metrics=metrics, num_examples=num_examples)))
    _, out = _legacy_fit(strategy, rnd, results)
    FUZZ["replies"] += 1
    assert out["nodes-replied"] in (3, 4) and strategy.history[-1]["round"] == rnd


def test_fedagg_replies_are_decoded_by_the_gate(caplog):
    from flwr_gkt.flower.fedagg_client import TierRole
    from flwr_gkt.flower.fedagg_strategy import FedAgg
    from flwr_gkt.wire import encode_embeddings

    agg = FedAgg.__new__(FedAgg)
    agg.gate, agg.rounds = ReplyGate(outlier_threshold=0.0, name="FedAgg"), RoundLog()
    agg.num_classes, agg.max_samples, agg.embeddings = 10, 8, {}
    eps, labels = torch.randn(6, 4, 2, 2), torch.randint(0, 10, (6,))

    class Grid:
        def send_and_receive(self, messages, timeout=None):
            good, nan, many, _ = messages

            def emb(e, y, n=None):
                rec = RecordDict({ARRAYS_KEY: encode_embeddings(e, y)})
                rec[METRICS_KEY] = metrics_record(len(y) if n is None else n)
                rec[METRICS_KEY]["status"] = 1.0  # a bookkeeping name: dropped
                return rec

            return [
                Message(emb(eps, labels), reply_to=good),
                Message(emb(eps * float("nan"), labels), reply_to=nan),
                Message(
                    emb(torch.randn(9, 4, 2, 2), torch.zeros(9, dtype=torch.long)), reply_to=many
                ),
                Message(emb(eps, labels), reply_to=good),  # a second reply
            ]

    roles = {
        u: (n, TierRole(u, "end", "cloud")) for u, n in (("e0", 1), ("e1", 2), ("e2", 3), ("e3", 4))
    }
    from collections import Counter

    nbytes = Counter()
    agg._config = lambda rnd, stage, **extra: ConfigRecord()
    with caplog.at_level(logging.WARNING):
        agg._init(Grid(), roles, 1, 1.0, nbytes)
    assert set(agg.embeddings) == {"e0"} and torch.equal(agg.embeddings["e0"][0], eps)
    rows = {(r["node"], r["status"]) for r in agg.node_history}
    assert ("e0", "accepted") in rows and ("e1", "rejected") in rows
    assert ("e2", "rejected") in rows and ("e3", "lost") in rows and ("e0", "duplicate") in rows
    assert nbytes["init-end-cloud"] == record_nbytes_of(eps, labels)
    assert all("status" not in r or r["status"] != 1.0 for r in agg.node_history)


def record_nbytes_of(eps, labels):
    from flwr_gkt.wire import encode_embeddings, record_nbytes

    return record_nbytes(RecordDict({ARRAYS_KEY: encode_embeddings(eps, labels)}))


def test_state_files_are_fsynced_with_their_directory(tmp_path, monkeypatch):
    from flwr_gkt.core import checkpoint

    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    checkpoint.write_atomic(tmp_path / "state.pt", b"new")
    assert synced == [False, True]  # the file, then the directory holding the rename
    assert (tmp_path / "state.pt").read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_fuzz_counts():
    """Runs after the fuzz tests (file order): how many generated replies went through."""
    print(f"\nwhole-message fuzz: {FUZZ['replies']} generated replies")
    assert FUZZ["replies"] >= 1000
