"""Server training on several devices (DDP, gloo on the CPU) against one process."""

import copy
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from flwr_gkt.core.distributed import DistributedError, ShardedEpochs, parse_devices
from flwr_gkt.core.payload import Payload
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.store import FeatureStore

ROOT = Path(__file__).resolve().parents[2]
SIZES = {1: 23, 2: 18}  # 41 samples: the last batch of 8 holds one sample, rank 1 gets none


def plain_model():
    """No BatchNorm, no dropout: two ranks must train it exactly as one process."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)
    )


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def payload(n, seed):
    g = torch.Generator().manual_seed(seed)
    return Payload(
        torch.randn(n, 4, 6, 6, generator=g),
        torch.randint(0, 5, (n,), generator=g),
        torch.randn(n, 5, generator=g),
    )


def server(model, devices=(), **kwargs):
    """A server holding both nodes, node 2's features spilled to disk."""
    options = {"epochs": 2, "batch_size": 8, "lr": 0.01, "device": "cpu", "seed": 3}
    budget = sum(payload(n, node).features.nbytes for node, n in SIZES.items()) - 1
    s = GKTServer(model, devices=devices, memory_budget=budget, **(options | kwargs))
    for node, n in SIZES.items():
        s.put(node, payload(n, node))
    assert s.store.is_spilled(2) and not s.store.is_spilled(1)
    return s


def outcome(s):
    weights = {k: v.clone() for k, v in s.model.state_dict().items()}
    return weights, torch.cat([s.server_logits(n) for n in SIZES])


def alive(pid):
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_parse_devices():
    assert parse_devices("") == []
    assert parse_devices("cpu:2") == ["cpu", "cpu"]
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="mixes"):
        parse_devices("cpu,cuda:0")
    with pytest.raises(ValueError, match="twice"):
        parse_devices("cuda:1,cuda:1")


def test_ranks_split_every_global_batch_and_weights_average_to_its_mean():
    store = FeatureStore()
    for node, n in SIZES.items():
        store.put(node, payload(n, node))
    order = torch.randperm(41, generator=torch.Generator().manual_seed(0))
    world, batch = 3, 8
    shards = [ShardedEpochs(store, [1, 2], [order], batch, r, world) for r in range(world)]
    batches = [list(s) for s in shards]
    labels = store.labels([1, 2])
    for k in range(len(shards[0])):
        chunk = order[k * batch : (k + 1) * batch]
        parts = [b[k] for b in batches]
        got = torch.cat([idx for _, _, idx in parts])
        assert sorted(got.tolist()) == sorted(chunk.tolist())  # disjoint, and all of it
        for features, y, idx in parts:
            assert len(features) == len(y) == len(idx)
            assert torch.equal(y, labels[idx])
    last = [
        list(s)[-1]
        for s in (ShardedEpochs(store, [1, 2], [order], batch, r, world) for r in range(world))
    ]
    assert [len(idx) for _, _, idx in last] == [1, 0, 0]


def test_two_gloo_ranks_train_as_one_process():
    reference = server(plain_model())
    ddp = server(plain_model(), devices=["cpu", "cpu"])
    try:
        for lr_scale in (1.0, 0.5):  # two rounds: the optimizer state goes back and forth
            expected = reference.train_round(lr_scale)
            got = ddp.train_round(lr_scale)
            assert got.num_examples == expected.num_examples == 41
            assert got.loss == pytest.approx(expected.loss, rel=1e-5)
            assert got.accuracy == expected.accuracy
            (w_ref, z_ref), (w_ddp, z_ddp) = outcome(reference), outcome(ddp)
            for key, value in w_ref.items():
                torch.testing.assert_close(w_ddp[key], value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(z_ddp, z_ref, rtol=1e-5, atol=1e-6)
            assert not torch.isnan(z_ddp).any()
        # asynchronous updates draw their samples through the same path
        torch.testing.assert_close(
            ddp.train_update(2).loss, reference.train_update(2).loss, rtol=1e-5, atol=0
        )
        for key, value in reference.model.state_dict().items():
            torch.testing.assert_close(ddp.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
        assert reference.generator.get_state().equal(ddp.generator.get_state())
    finally:
        ddp.close()


def test_batchnorm_ranks_normalise_their_half_batch_close_to_one_process():
    """Without SyncBatchNorm on the CPU each rank's BatchNorm sees its own half-batch:
    not the same numbers, but an update of the same direction and size."""
    start = {k: v.clone() for k, v in bn_model().state_dict().items()}
    reference = server(bn_model(), epochs=1, batch_size=16, optimizer="sgd")
    ddp = server(bn_model(), devices=["cpu", "cpu"], epochs=1, batch_size=16, optimizer="sgd")
    try:
        reference.train_round()
        ddp.train_round()
        for key, _ in reference.model.named_parameters():
            step_ref = reference.model.state_dict()[key] - start[key]
            step_ddp = ddp.model.state_dict()[key] - start[key]
            cosine = nn.functional.cosine_similarity(step_ref.flatten(), step_ddp.flatten(), 0)
            assert cosine > 0.8, key
            assert 0.75 < step_ddp.norm() / step_ref.norm() < 1.33, key
        weight = "0.weight"  # the batch statistics differ, so the updates do
        assert not torch.allclose(
            ddp.model.state_dict()[weight], reference.model.state_dict()[weight]
        )
    finally:
        ddp.close()


def test_a_killed_worker_fails_the_round_and_the_next_server_resumes(tmp_path):
    ddp = server(plain_model(), devices=["cpu", "cpu"])
    ddp.train_round()
    checkpoint = copy.deepcopy(ddp.state_dict())
    pids = ddp.trainer.pids
    ddp.epochs = 5000  # long enough to be killed in the middle
    killer = threading.Timer(1.0, os.kill, (pids[1], signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    with pytest.raises(DistributedError, match=rf"pid {pids[1]}\) exited with code -9"):
        ddp.train_round()
    assert time.monotonic() - start < 60
    killer.join()
    assert not any(alive(pid) for pid in pids) and ddp.trainer.pids == []
    # The model was left as it was; a new server from the checkpoint trains on
    for key, value in checkpoint["model"].items():
        assert torch.equal(ddp.model.state_dict()[key], value)
    resumed = server(plain_model(), devices=["cpu", "cpu"])
    reference = server(plain_model())
    try:
        resumed.load_state_dict(checkpoint)
        reference.load_state_dict(checkpoint)
        assert resumed.train_round().loss == pytest.approx(reference.train_round().loss, rel=1e-5)
        (w_ref, z_ref), (w_res, z_res) = outcome(reference), outcome(resumed)
        for key, value in w_ref.items():
            torch.testing.assert_close(w_res[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z_res, z_ref, rtol=1e-5, atol=1e-6)
    finally:
        resumed.close()


def test_no_worker_outlives_close_or_the_interpreter():
    ddp = server(plain_model(), devices=["cpu", "cpu"], epochs=1)
    ddp.train_round()
    pids = ddp.trainer.pids
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    ddp.close()
    assert not any(alive(pid) for pid in pids)
    script = textwrap.dedent(
        """
        import torch
        from torch import nn
        from flwr_gkt.core.payload import Payload
        from flwr_gkt.core.server import GKTServer

        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        s = GKTServer(model, device="cpu", devices=["cpu", "cpu"], batch_size=4)
        s.put(1, Payload(torch.randn(8, 4, 1, 1), torch.randint(0, 3, (8,)), None))
        s.train_round()
        print(*s.trainer.pids)  # exits without close()
        """
    )
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    child_pids = [int(p) for p in done.stdout.split()]
    assert len(child_pids) == 2
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in child_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in child_pids)
