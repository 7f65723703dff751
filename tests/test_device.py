"""The one device choice (training, evaluation, the regions stage's detectors) and its errors."""

from __future__ import annotations

import pytest
import torch

from muvla.utils.config import ConfigError
from muvla.utils.device import pick_device


def test_cpu_and_auto_without_cuda() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cpu:0", "cuda:x", "cuda:", ""])
def test_unknown_devices_are_one_line_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^device must be one of auto, cpu, cuda or cuda:<index>, got "):
        pick_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused(device: str) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        pick_device(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_and_local_rank() -> None:
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    assert pick_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert pick_device("auto", local_rank=torch.cuda.device_count()) == torch.device("cuda", 0)  # wraps around
    with pytest.raises(ConfigError, match="CUDA device"):
        pick_device(f"cuda:{torch.cuda.device_count()}")
