"""The server's feature store: memory budget, spill to disk, streamed batches."""

import gc
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_gkt.core.registry import build_server_model
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.store import FeatureStore
from flwr_gkt.wire import Payload


def payload(n, seed, shape=(4, 5, 5), classes=10):
    g = torch.Generator().manual_seed(seed)
    return Payload(
        features=torch.randn((n, *shape), generator=g),
        labels=torch.randint(0, classes, (n,), generator=g),
        logits=torch.randn((n, classes), generator=g),
    )


def feature_bytes(p):
    return p.features.nbytes


def test_spilled_store_returns_exactly_what_was_stored(tmp_path):
    payloads = {1: payload(30, 1), 2: payload(7, 2), 3: payload(50, 3)}
    # Room for node 1's features and everyone's labels and logits: nodes 2 and 3 go to disk.
    small = sum(p.labels.nbytes + p.logits.nbytes for p in payloads.values())
    budget = feature_bytes(payloads[1]) + small + 500
    store = FeatureStore(memory_budget=budget, spill_dir=tmp_path / "spill")
    for node, p in payloads.items():
        store.put(node, p)
        assert store.memory_bytes <= budget
    assert not store.is_spilled(1) and store.is_spilled(2) and store.is_spilled(3)
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == [
        "node-2-v1.npy",
        "node-3-v1.npy",
    ]
    # The spill files are plain .npy files holding the features.
    assert torch.equal(
        torch.from_numpy(np.load(tmp_path / "spill" / "node-3-v1.npy")), payloads[3].features
    )
    for node, p in payloads.items():
        got = store[node]
        assert torch.equal(got.features, p.features)
        assert torch.equal(got.labels, p.labels)
        assert torch.equal(got.logits, p.logits)
    assert store.disk_bytes == feature_bytes(payloads[2]) + feature_bytes(payloads[3])


def test_labels_and_logits_of_spilled_nodes_push_older_features_out(tmp_path):
    """The budget holds: when spilled nodes' labels and logits fill it, older features spill too."""
    store = FeatureStore(memory_budget=feature_bytes(payload(30, 1)) + 1500, spill_dir=tmp_path)
    store.put(1, payload(30, 1))
    assert not store.is_spilled(1)
    store.put(
        2, payload(40, 2)
    )  # its labels + logits (1,920 bytes) no longer leave room for node 1
    assert store.is_spilled(1) and store.is_spilled(2)
    assert store.memory_bytes <= store.memory_budget
    assert torch.equal(store[1].features, payload(30, 1).features)


def test_streamed_batches_cover_every_sample_once_with_its_label(tmp_path):
    payloads = {5: payload(23, 5), 6: payload(40, 6), 7: payload(11, 7)}
    store = FeatureStore(memory_budget=feature_bytes(payloads[5]) + 4000, spill_dir=tmp_path)
    for node, p in payloads.items():
        store.put(node, p)
    assert sum(store.is_spilled(n) for n in payloads) == 2
    nodes = [5, 6, 7]
    features = torch.cat([payloads[n].features for n in nodes])
    labels = torch.cat([payloads[n].labels for n in nodes])
    seen = []
    for x, y, idx in store.batches(
        nodes, 8, shuffle=True, generator=torch.Generator().manual_seed(0)
    ):
        assert torch.equal(x, features[idx]) and torch.equal(y, labels[idx])
        seen.append(idx)
    seen = torch.cat(seen)
    assert sorted(seen.tolist()) == list(range(len(labels)))
    assert not torch.equal(seen, torch.arange(len(labels)))  # shuffled
    assert torch.equal(store.logits(nodes), torch.cat([payloads[n].logits for n in nodes]))


def test_replacing_and_removing_nodes_deletes_their_files(tmp_path):
    store = FeatureStore(memory_budget=0, spill_dir=tmp_path)
    store.put(1, payload(10, 1))
    store.put(1, payload(12, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["node-1-v2.npy"]
    assert store.num_samples(1) == 12 and torch.equal(store[1].features, payload(12, 2).features)
    store.remove(1)
    assert list(tmp_path.iterdir()) == [] and 1 not in store


def test_temporary_spill_directory_is_removed_on_close():
    store = FeatureStore(memory_budget=0)
    store.put(3, payload(4, 3))
    spill_dir = store._spill_dir
    assert spill_dir is not None and any(spill_dir.iterdir())
    store.close()
    assert not spill_dir.exists()


@pytest.mark.parametrize("given_dir", [False, True])
def test_a_store_never_closed_leaves_no_features_on_disk_at_exit(tmp_path, given_dir):
    """Spill files hold nodes' features: gone at exit, even from a store left in a cycle."""
    spill_dir = repr(str(tmp_path / "spill")) if given_dir else "None"
    script = f"""
import torch
from flwr_gkt.core.payload import Payload
from flwr_gkt.core.store import FeatureStore
store = FeatureStore(memory_budget=0, spill_dir={spill_dir})
store.put(3, Payload(torch.rand(4, 2, 3, 3), torch.zeros(4, dtype=torch.long), None))
print(next(store._spill_dir.iterdir()))
holder = torch.nn.Module()
holder.store, holder.me = store, holder  # a cycle: never collected before exit, never closed
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    written = Path(done.stdout.strip().splitlines()[-1])
    assert written.name == "node-3-v1.npy"
    assert not written.exists()
    assert not written.parent.exists()  # the directory too, left empty (as close() does)


def test_a_collected_store_removes_its_spill_files(tmp_path):
    store = FeatureStore(memory_budget=0, spill_dir=tmp_path / "spill")
    store.put(1, payload(10, 1))
    assert len(list((tmp_path / "spill").iterdir())) == 1
    del store
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_set_logits_checks_the_count(tmp_path):
    store = FeatureStore(memory_budget=0, spill_dir=tmp_path)
    store.put(1, payload(10, 1))
    new = torch.randn(10, 10)
    store.set_logits(1, new)
    assert torch.equal(store[1].logits, new)
    with pytest.raises(ValueError, match="9 logits for 10 stored samples"):
        store.set_logits(1, torch.randn(9, 10))


@pytest.mark.parametrize("budget", [0, 140_000])
def test_server_training_from_disk_equals_training_in_memory(tmp_path, budget):
    """Same seed, same data: spilling changes where features live, not the result."""
    payloads = {1: payload(40, 1, (16, 7, 7)), 2: payload(24, 2, (16, 7, 7))}

    def run(memory_budget):
        torch.manual_seed(0)
        server = GKTServer(
            build_server_model("resnet10", 10),
            epochs=2,
            batch_size=16,
            device="cpu",
            memory_budget=memory_budget,
            spill_dir=tmp_path / str(memory_budget),
        )
        for node, p in payloads.items():
            server.put(node, p)
        result = server.train_round()
        return server, result

    ref, ref_result = run(None)
    spilled, result = run(budget)
    assert spilled.store.disk_bytes > 0
    if budget == 0:  # every node's features on disk (labels and logits alone exceed a zero budget)
        assert all(spilled.store.is_spilled(n) for n in payloads)
    else:
        assert spilled.store.memory_bytes <= budget and not all(
            spilled.store.is_spilled(n) for n in payloads
        )
    assert result.num_examples == ref_result.num_examples == 64
    assert result.loss == pytest.approx(ref_result.loss, rel=1e-5)
    for node in payloads:
        torch.testing.assert_close(spilled.server_logits(node), ref.server_logits(node))


def test_sized_batches_draw_that_many_distinct_samples_per_pass(tmp_path):
    store = FeatureStore(memory_budget=0, spill_dir=tmp_path)
    store.put(1, payload(20, 1))
    store.put(2, payload(30, 2))
    batches = store.batches([1, 2], 8, generator=torch.Generator().manual_seed(0), size=20)
    assert len(batches) == 3
    passes = [torch.cat([idx for _, _, idx in batches]) for _ in range(2)]
    for idx in passes:
        assert len(idx) == 20 and len(set(idx.tolist())) == 20 and int(idx.max()) < 50
    assert not torch.equal(passes[0], passes[1])  # drawn anew each pass


def test_share_moves_in_memory_features_to_shared_memory_once_and_maps_spilled_ones(tmp_path):
    payloads = {1: payload(30, 1), 2: payload(20, 2)}
    budget = feature_bytes(payloads[1]) + sum(
        p.labels.nbytes + p.logits.nbytes for p in payloads.values()
    )
    store = FeatureStore(memory_budget=budget, spill_dir=tmp_path)
    for node, p in payloads.items():
        store.put(node, p)
    memory = store.memory_bytes
    shared, spill = store.share(1)
    assert spill is None and shared.features.is_shared()
    assert torch.equal(shared.features, payloads[1].features)
    again, _ = store.share(1)
    assert again.features.data_ptr() == shared.features.data_ptr()  # no second copy
    assert store.memory_bytes == memory
    empty, spill = store.share(2)
    assert spill is not None and len(empty.features) == 0
    assert torch.equal(spill.memmap(), payloads[2].features)
