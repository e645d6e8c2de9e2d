"""What a rank meets before training, on CPU and without a GPU: the GPU a node-local rank takes is
`local_rank % GPUs it sees`, so a site that binds one GPU per task (local rank 3 sees one GPU) works, and
LOCAL_RANK then names that GPU for DeepSpeed.
"""
from __future__ import annotations

import os

import pytest
import torch

from fwl_scale.config import ConfigError
from fwl_scale.device import cuda_device_index, select_cuda_device


@pytest.fixture
def environ():
    """os.environ as it was before the test: the code under test writes to it."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("local_rank,count,index", [
    (0, 8, 0), (3, 8, 3), (7, 8, 7),  # every rank of the node sees all its GPUs (--gpus-per-node)
    (0, 1, 0), (3, 1, 0), (7, 1, 0),  # one GPU bound per task: each sees only its own
    (5, 4, 1), (3, 2, 1),             # more ranks than GPUs seen: shared (NCCL refuses that at start-up)
])
def test_cuda_device_index(local_rank, count, index):
    assert cuda_device_index(local_rank, count) == index


def test_cuda_device_index_without_a_gpu_says_so(environ):
    environ["CUDA_VISIBLE_DEVICES"] = ""
    with pytest.raises(ConfigError, match=r"local rank 3 is to train on a GPU but sees none "
                                          r"\(CUDA_VISIBLE_DEVICES=''\)"):
        cuda_device_index(3, 0)
    with pytest.raises(ConfigError, match="LOCAL_RANK=-1"):
        cuda_device_index(-1, 2)


def test_select_cuda_device_with_one_gpu_bound_per_task(environ, monkeypatch):
    """Local rank 3 where CUDA_VISIBLE_DEVICES holds one GPU: device 0 is made current, and LOCAL_RANK
    (DeepSpeed's device ordinal) says 0."""
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    environ["LOCAL_RANK"] = "3"
    assert select_cuda_device(3) == torch.device("cuda", 0)
    assert current == [0] and environ["LOCAL_RANK"] == "0"
