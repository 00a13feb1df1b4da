import os

import pytest
import torch

from tests.helpers.federation import set_task_identity


@pytest.fixture(scope="session")
def bridge_autoencoder(tmp_path_factory):
    """A bridge autoencoder trained once per test run on held-out Fashion-MNIST: ``(path, info)``.

    Shared by the FedAgg building-block tests and the FedAgg runs (training it
    is the slow part of both).
    """
    from flwr_gkt.data.bridge import pretrain_autoencoder

    path = tmp_path_factory.mktemp("bridge") / "bridge.pt"
    info = pretrain_autoencoder(path, samples=2000, epochs=2, fraction=0.1, device="cpu")
    return path, info


@pytest.fixture
def one_thread():
    """One torch thread (small batches; on a busy 2-core machine 2 threads are many times slower).

    For a whole module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: torch threads per test (``make test`` sets 1: its second pytest process runs beside this
#: one, and two processes with 2 threads each on 2 cores slow each other down many times).
TEST_THREADS = int(os.environ.get("FLWR_GKT_TEST_THREADS", "2"))


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()
    torch.set_num_threads(TEST_THREADS)
