import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from local_federation import set_task_identity


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()
    torch.set_num_threads(2)
