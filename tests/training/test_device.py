"""train.device: the setting to torch device, with CUDA mocked (the suite needs no GPU)."""

import pytest
import torch

from altgrad.training.config import ConfigError, load_config
from altgrad.training.device import resolve_device


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # as a --jobs worker placed on GPU 1


def test_without_cuda_auto_is_the_cpu_and_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"train.device is 'cuda' but this machine has 0 CUDA device\(s\)"):
        resolve_device("cuda")


def test_with_gpus_auto_and_cuda_are_the_current_device_and_cuda_n_is_gpu_n(two_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match=r"'cuda:2' but this machine has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_the_config_key_accepts_only_the_four_forms(value):
    with pytest.raises(ConfigError, match="train.device"):
        load_config(None, [f"train.device={value}"])
    assert load_config(None, ["train.device=cuda:3"]).train.device == "cuda:3"
