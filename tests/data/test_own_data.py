"""Nodes bring their own data: map-style torch / Hugging Face datasets streamed in batches.

FedGKT's server logits ``Z_s`` come back one row per training sample, in the
order the node uploaded ``H``, ``Z_c`` and ``Y``; the node distils from them
the next round. These tests check that a streamed dataset keeps that
alignment -- even when the dataset applies a random transform -- that it
trains exactly as the same samples held as in-memory tensors, and that a
small federation over such datasets learns.
"""

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType
from flwr_datasets.partitioner import IidPartitioner
from PIL import Image as PILImage
from torch.utils.data import IterableDataset, TensorDataset

import flwr_gkt.core.training as training
from flwr_gkt.core.edge import EdgeRoundConfig, extract_batches
from flwr_gkt.core.models import resnet4
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.training import DatasetBatches
from flwr_gkt.data import DatasetData, HFImageDataset, client_data, dataset_info, load_dataset
from flwr_gkt.flower.client_app import handle_evaluate, handle_train
from flwr_gkt.flower.options import SamplingOptions
from flwr_gkt.flower.strategy import FedGKT
from flwr_gkt.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, encode_server_logits
from tests.helpers.federation import LocalFederation, set_task_identity

N = 40  # samples of the index-coded datasets
SIDE = 8
LABELS = torch.randint(0, 10, (N,), generator=torch.Generator().manual_seed(5))


# ------------------------------------------------------------------ datasets
class IndexImages(torch.utils.data.Dataset):
    """Sample ``i``: every pixel ``i / N``, label ``LABELS[i]``.

    ``random``: plus uniform noise below ``0.25 / N`` and a random horizontal
    flip, drawn afresh on every read (augmentation inside the dataset). The
    image's mean still rounds to ``i / N``: :func:`decode_index` reads ``i``
    back from whatever view the model saw.
    """

    def __init__(self, random: bool = True):
        self.random = random

    def __len__(self):
        return N

    def __getitem__(self, i):
        return random_view(torch.full((1, SIDE, SIDE), i / N), self.random), int(LABELS[i])


def random_view(x: torch.Tensor, random: bool = True) -> torch.Tensor:
    if not random:
        return x
    x = x + (torch.rand_like(x) - 0.5) * (0.5 / N)
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def decode_index(images: torch.Tensor) -> torch.Tensor:
    return (images.mean(dim=(1, 2, 3)) * N).round().long()


def index_hf_dataset(random: bool = True):
    """The same samples as a Hugging Face dataset: ``uint8`` pixel ``i``, a batched transform."""
    images = np.repeat(np.arange(N, dtype=np.uint8), SIDE * SIDE).reshape(N, 1, SIDE, SIDE)
    ds = Dataset.from_dict({"pixels": images, "y": LABELS.numpy()})

    def transform(batch):
        x = torch.as_tensor(np.asarray(batch["pixels"], dtype=np.float32)) / N
        return {"pixels": [random_view(img, random) for img in x], "y": batch["y"]}

    return ds.with_transform(transform)


# ------------------------------------------------------------------ helpers
def train_message(server_logits=None, **config) -> Message:
    content = RecordDict(
        {CONFIG_KEY: ConfigRecord({"batch-size": 8, "seed": 1, "server-round": 2, **config})}
    )
    if server_logits is not None:
        content[ARRAYS_KEY] = encode_server_logits(server_logits)
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def fresh_context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def payload(reply: Message, key: str) -> torch.Tensor:
    return torch.from_numpy(reply.content[ARRAYS_KEY][key].numpy())


class Spy:
    """Records, batch by batch, the inputs the edge trained on and the ``Z_s`` rows it used.

    ``model(inputs)`` runs the training forward pass (a forward pre-hook on the
    model sees ``inputs``); ``gkt_loss`` then gets that batch's labels and teacher rows.
    Every pass through the extractor (training and extraction) is recorded too.
    """

    def __init__(self, monkeypatch):
        self.trained, self.teachers, self.labels, self.extracted = [], [], [], []
        real = training.gkt_loss

        def spy_loss(logits, labels, teacher, *args):
            self.labels.append(labels.clone())
            self.teachers.append(None if teacher is None else teacher.clone())
            return real(logits, labels, teacher, *args)

        monkeypatch.setattr(training, "gkt_loss", spy_loss)

    def build(self):
        torch.manual_seed(0)
        model = resnet4(10, 1)
        model.register_forward_pre_hook(lambda m, args: self.trained.append(args[0].clone()))
        model.extractor.register_forward_pre_hook(
            lambda m, args: self.extracted.append(args[0].clone())
        )
        return model


# ------------------------------------------------------------------ alignment
@pytest.mark.parametrize(
    "source,workers",
    [("torch", 0), ("hf", 0), ("hf", 2)],
    ids=["torch-dataset", "hf-dataset", "hf-dataset-2-workers"],
)
def test_each_sample_distils_from_its_own_server_logits_under_a_random_transform(
    source, workers, monkeypatch
):
    set_task_identity()
    train = IndexImages() if source == "torch" else index_hf_dataset()
    data = DatasetData(
        train, num_classes=10, image_key="pixels", label_key="y", num_workers=workers
    )
    # The server's logits encode the sample they belong to: row i is (i, 0, ..., 0).
    zs = torch.zeros(N, 10)
    zs[:, 0] = torch.arange(N, dtype=torch.float32)
    spy = Spy(monkeypatch)

    reply = handle_train(train_message(zs, epochs=2), fresh_context(), data, spy.build, "cpu")

    assert len(spy.trained) == len(spy.teachers) == 2 * 5  # 2 epochs of 5 batches of 8
    for inputs, teacher, labels in zip(spy.trained, spy.teachers, spy.labels, strict=True):
        sample = decode_index(inputs)  # which sample each image of the batch is
        assert torch.equal(teacher[:, 0].long(), sample)  # ... distils from that sample's row
        assert torch.equal(labels, LABELS[sample])  # ... with that sample's label
    epoch = torch.cat([decode_index(x) for x in spy.trained[:5]])
    assert sorted(epoch.tolist()) == list(range(N))  # every sample once per epoch
    assert not torch.equal(epoch, torch.arange(N))  # shuffled: the check above means something
    # The transform was random: the views differ from the clean images.
    assert any(
        not torch.equal(x, x.mean((1, 2, 3), keepdim=True).expand_as(x)) for x in spy.trained
    )

    # Upload: row i is sample i (the extraction pass reads 0..N-1), labels in that order.
    extraction = torch.cat(spy.extracted[-5:])
    assert torch.equal(decode_index(extraction), torch.arange(N))
    assert torch.equal(payload(reply, "labels"), LABELS)
    assert payload(reply, "features").shape == (N, 16, SIDE, SIDE)
    assert reply.content[METRICS_KEY]["used-server-logits"] == 1.0


def test_replay_rounds_extract_from_the_plain_training_split(monkeypatch):
    set_task_identity()
    data = DatasetData(IndexImages(), plain_train=IndexImages(random=False), num_classes=10)
    spy = Spy(monkeypatch)
    handle_train(
        train_message(**{"extract-augment": False}), fresh_context(), data, spy.build, "cpu"
    )
    extraction = torch.cat(spy.extracted[-5:])
    clean = (torch.arange(N) / N).view(N, 1, 1, 1).expand(N, 1, SIDE, SIDE)
    assert torch.equal(extraction, clean)  # no noise, no flip: the plain split
    handle_train(train_message(), fresh_context(), data, spy.build, "cpu")
    assert not torch.equal(torch.cat(spy.extracted[-5:]), clean)  # augmented by default


def test_streamed_tensors_train_exactly_as_the_same_tensors_in_memory():
    """A TensorDataset streamed through the DataLoader gives the ClientData path's bits."""
    set_task_identity()
    data = client_data(0, 2, fraction=0.003, test_fraction=0.005)
    streamed = DatasetData(
        TensorDataset(data.x_train, data.y_train), TensorDataset(data.x_test, data.y_test)
    )
    zs = torch.randn(len(data.y_train), 10, generator=torch.Generator().manual_seed(1))

    def build():
        torch.manual_seed(0)
        return resnet4(10, 1)

    replies = []
    for node_data in (data, streamed):
        context = fresh_context()
        train = handle_train(train_message(zs, epochs=2), context, node_data, build, "cpu")
        evaluate = handle_evaluate(
            Message(
                RecordDict({CONFIG_KEY: ConfigRecord({"batch-size": 8})}),
                dst_node_id=1,
                message_type=MessageType.EVALUATE,
            ),
            context,
            node_data,
            build,
            "cpu",
        )
        replies.append((train, evaluate))
    (train_a, eval_a), (train_b, eval_b) = replies
    for key in ("features", "logits", "labels"):
        assert torch.equal(payload(train_a, key), payload(train_b, key))
    for key in ("features", "labels"):
        assert torch.equal(payload(eval_a, key), payload(eval_b, key))
    for (a, b), key in [((train_a, train_b), "edge-train-loss"), ((eval_a, eval_b), "edge-loss")]:
        assert a.content[METRICS_KEY][key] == b.content[METRICS_KEY][key]


# ------------------------------------------------------------------ checks
def test_dataset_data_refuses_what_has_no_stable_order_or_wrong_images():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1, 4, 4), 0

    with pytest.raises(TypeError, match="map-style"):
        DatasetData(Stream())
    with pytest.raises(ValueError, match="same samples"):
        DatasetData(IndexImages(), plain_train=TensorDataset(torch.zeros(3, 1, 4, 4), LABELS[:3]))
    with pytest.raises(ValueError, match="empty"):
        DatasetData(TensorDataset(torch.zeros(0, 1, 4, 4), torch.zeros(0)))
    with pytest.raises(KeyError, match="image_key"):
        DatasetData(index_hf_dataset())  # columns "pixels" / "y", not "image" / "label"
    raw = DatasetData(TensorDataset(torch.zeros(4, 1, 4, 4, dtype=torch.uint8), LABELS[:4]))
    with pytest.raises(TypeError, match="normalise"):
        next(iter(raw.train_batches(2)))
    shuffled = DatasetBatches(IndexImages(), 8, shuffle=True)
    with pytest.raises(ValueError, match="index order"):
        extract_batches(resnet4(10, 1), shuffled, torch.device("cpu"))
    no_test = DatasetData(IndexImages())
    with pytest.raises(ValueError, match="no test split"):
        no_test.test_batches(8)


def test_hf_dataset_reads_a_batch_at_once():
    ds = HFImageDataset(index_hf_dataset(random=False), "pixels", "y")
    assert len(ds) == N
    image, label = ds[3]
    assert image.shape == (1, SIDE, SIDE) and label == int(LABELS[3])
    rows = ds.__getitems__([5, 1])
    assert [label for _, label in rows] == [int(LABELS[5]), int(LABELS[1])]
    assert torch.equal(rows[0][0], torch.full((1, SIDE, SIDE), 5 / N))
    inputs, labels, index = next(iter(DatasetBatches(ds, 16)))
    assert inputs.shape == (16, 1, SIDE, SIDE) and inputs.dtype == torch.float32
    assert torch.equal(index, torch.arange(16)) and torch.equal(labels, LABELS[:16])


# ------------------------------------------------------------------ federation
class ArrayImages(torch.utils.data.Dataset):
    """A plain torch dataset: a node's own ``uint8`` images, normalised on read."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        info = dataset_info("fashion-mnist")
        self.mean, self.std = info.mean[0], info.std[0]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = torch.from_numpy(self.images[i]).float().div(255).unsqueeze(0)
        return (x - self.mean) / self.std, int(self.labels[i])


def fashion_mnist_partitions(num_nodes: int, train_size: int, test_size: int):
    """FederatedDataset-style partitions, offline: HF datasets (``Image`` column) split by IidPartitioner."""
    raw = load_dataset("fashion-mnist")
    rng = np.random.default_rng(0)
    splits = []
    for x, y, size in ((raw.x_train, raw.y_train, train_size), (raw.x_test, raw.y_test, test_size)):
        idx = rng.permutation(len(y))[:size]
        features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
        images = [PILImage.fromarray(a) for a in x[idx, 0].numpy()]
        partitioner = IidPartitioner(num_nodes)
        partitioner.dataset = Dataset.from_dict(
            {"image": images, "label": y[idx].numpy()}, features=features
        )
        splits.append([partitioner.load_partition(pid) for pid in range(num_nodes)])
    return splits


def pil_transform(flip: bool):
    info = dataset_info("fashion-mnist")

    def transform(batch):
        images = []
        for im in batch["image"]:
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).unsqueeze(0)
            x = (x - info.mean[0]) / info.std[0]
            images.append(x.flip(-1) if flip and torch.rand(()) < 0.5 else x)
        return {"image": images, "label": batch["label"]}

    return transform


def test_fedgkt_learns_on_streamed_hf_and_torch_datasets():
    train_parts, test_parts = fashion_mnist_partitions(2, train_size=400, test_size=200)
    nodes = [
        # node 0: its HF partition with a random flip, the plain view for replay rounds
        DatasetData(
            train_parts[0].with_transform(pil_transform(flip=True)),
            test_parts[0].with_transform(pil_transform(flip=False)),
            plain_train=train_parts[0].with_transform(pil_transform(flip=False)),
        ),
        # node 1: the same kind of partition read by its own torch Dataset class
        DatasetData(
            *(
                ArrayImages(
                    np.stack([np.asarray(im) for im in part["image"]]), np.asarray(part["label"])
                )
                for part in (train_parts[1], test_parts[1])
            )
        ),
    ]

    def build(seed):
        def make():
            torch.manual_seed(seed)
            return resnet4(10, 1)

        return make

    fed = LocalFederation([11, 22], nodes, [build(0), build(1)])
    torch.manual_seed(0)
    server_model = torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3, stride=2),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    server = GKTServer(server_model, epochs=2, batch_size=16, lr=5e-3, device="cpu")
    strategy = FedGKT(
        server,
        10,
        feature_shape=(16, 28, 28),
        edge_config=EdgeRoundConfig(batch_size=16, epochs=2, lr=5e-3),
        sampling=SamplingOptions(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2),
    )
    losses = []
    for rnd in (1, 2, 3):
        (_, train_metrics), _ = fed.run_round(strategy, rnd)
        losses.append(train_metrics["edge-train-loss"])
    last = strategy.history[-1]
    assert last["nodes-replied"] == 2 and last["num-examples"] == 200
    assert last["accuracy"] > 0.25  # 10 classes: chance is 0.1 (0.37 here)
    assert last["edge-accuracy"] > 0.15  # the edge models alone (0.26 here)
    # the server holds each node's labels in the node's dataset order
    for nid, data in zip((11, 22), nodes, strict=True):
        expected = [int(data.train[i][1]) for i in range(data.num_train)]
        assert strategy.server.store[nid].labels.tolist() == expected
    assert losses[-1] < losses[0]  # the edge models' training loss went down
