"""The in-process runtime (``flwr_gkt.app.inprocess``): a real ClientApp behind a Grid, no Ray."""

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from flwr_gkt.app.inprocess import InProcessGrid, run_inprocess


def _counting_app(fail_on: set[int] = frozenset()) -> ClientApp:
    """Replies with its node's config and a per-node message count kept in ``context.state``;
    raises on ``train`` messages whose ``config["i"]`` is in ``fail_on`` (after counting)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        counts = context.state.config_records.setdefault("counts", ConfigRecord({"n": 0}))
        counts["n"] = int(counts["n"]) + 1
        i = int(msg.content["config"]["i"])
        if i in fail_on:
            raise RuntimeError(f"boom on message {i}")
        metrics = MetricRecord(
            {
                "n": counts["n"],
                "partition-id": context.node_config["partition-id"],
                "num-partitions": context.node_config["num-partitions"],
                "node-id": context.node_id,
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _train(dst: int, i: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"i": i})}), dst, "train")


def test_reply_metadata_node_ids_and_configs():
    grid = InProcessGrid(
        _counting_app(), 3, run_config={"k": 1}, node_configs=[{}, {"extra": "x"}, {}]
    )
    assert list(grid.get_node_ids()) == [1001, 1002, 1003]
    assert grid.context(1002).node_config == {"partition-id": 1, "num-partitions": 3, "extra": "x"}
    assert grid.context(1002).run_config == {"k": 1}
    assert grid.run.run_id == 1

    msgs = [_train(nid, i) for i, nid in enumerate(grid.get_node_ids())]
    ids = list(grid.push_messages(msgs))
    assert len(set(ids)) == 3 and all(ids)
    assert [m.metadata.message_id for m in msgs] == ids
    assert grid.handled == 0  # lazily: nothing runs before a pull

    replies = list(grid.pull_messages(ids[::-1]))  # handled in push order
    assert grid.handled == 3
    for msg, reply in zip(msgs, replies, strict=True):
        assert not reply.has_error()
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert reply.metadata.src_node_id == msg.metadata.dst_node_id
        assert reply.metadata.dst_node_id == msg.metadata.src_node_id
        assert reply.metadata.message_id not in ("", msg.metadata.message_id)
        assert reply.metadata.run_id == msg.metadata.run_id
        assert reply.metadata.message_type == "train"
        assert reply.content["metrics"]["node-id"] == msg.metadata.dst_node_id
    assert [r.content["metrics"]["partition-id"] for r in replies] == [0, 1, 2]
    assert {r.content["metrics"]["num-partitions"] for r in replies} == {3}
    assert list(grid.pull_messages(ids)) == []  # each reply is delivered once


def test_a_raising_client_app_gives_an_error_reply_and_the_grid_goes_on(caplog):
    grid = InProcessGrid(_counting_app(fail_on={1}), 2, pull_interval=0.0)
    node = 1001
    first = list(grid.send_and_receive([_train(node, 0)]))
    assert len(first) == 1 and first[0].content["metrics"]["n"] == 1

    msg = _train(node, 1)
    with caplog.at_level("WARNING", logger="flwr"):
        replies = list(grid.send_and_receive([msg], timeout=5))
    assert len(replies) == 1 and replies[0].has_error()
    error = replies[0].error
    assert error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "boom on message 1" in error.reason and "RuntimeError" in error.reason
    assert replies[0].metadata.reply_to_message_id == msg.metadata.message_id
    assert replies[0].metadata.src_node_id == node
    assert any("1001" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)

    # the next message is served; the failed call's state change was not kept (as on a SuperNode)
    after = list(grid.send_and_receive([_train(node, 2), _train(1002, 3)]))
    assert [r.has_error() for r in after] == [False, False]
    assert [r.content["metrics"]["n"] for r in after] == [2, 1]


def test_the_client_app_gets_copies_and_bad_replies_become_errors():
    seen = []

    def app(msg: Message, context: Context) -> Message:
        seen.append(msg)
        msg.content["config"]["i"] = 99  # must not reach the server's message
        if msg.content["config"].get("bad"):
            return Message(RecordDict(), 1001, "train")  # not a reply
        return Message(RecordDict(), reply_to=msg)

    grid = InProcessGrid(app, 1)
    msg = _train(1001, 0)
    (ok,) = grid.send_and_receive([msg])
    assert not ok.has_error() and msg.content["config"]["i"] == 0 and seen[0] is not msg
    bad = _train(1001, 0)
    bad.content["config"]["bad"] = True
    (err,) = grid.send_and_receive([bad])
    assert err.has_error() and "not a reply" in err.error.reason


def test_run_inprocess_calls_a_server_app_main():
    from flwr.serverapp import ServerApp

    server_app, seen = ServerApp(), {}

    @server_app.main()
    def main(grid, context):
        seen["context"] = context
        seen["replies"] = list(grid.send_and_receive([_train(n, 0) for n in grid.get_node_ids()]))

    run_inprocess(server_app, _counting_app(), 2, run_config={"a": "b"})
    assert seen["context"].node_id == 0 and seen["context"].run_config == {"a": "b"}
    assert [r.content["metrics"]["partition-id"] for r in seen["replies"]] == [0, 1]


def test_a_client_apps_thread_setting_does_not_reach_the_server():
    import torch

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # as the ClientApp does with client-threads = 1
        return Message(
            RecordDict({"metrics": MetricRecord({"t": torch.get_num_threads()})}), reply_to=msg
        )

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grid = InProcessGrid(app, 1)
        (reply,) = grid.send_and_receive([_train(next(iter(grid.get_node_ids())), 0)])
        assert reply.content["metrics"]["t"] == 1
        assert torch.get_num_threads() == 2  # the server trains with its own threads
    finally:
        torch.set_num_threads(before)


def test_the_inprocess_runtime_lets_each_node_use_every_core():
    from flwr_gkt.app.__main__ import build_config

    cfg, _, _ = build_config(["--preset", "smoke", "--runtime", "inprocess"])
    assert cfg.client_threads == 0
    cfg, _, _ = build_config(
        ["--preset", "smoke", "--runtime", "inprocess", "--set", "client-threads=1"]
    )
    assert cfg.client_threads == 1
    cfg, _, _ = build_config(["--preset", "smoke"])
    assert cfg.client_threads == 1  # Ray runs nodes side by side
