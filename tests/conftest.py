"""Fixtures shared by the tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: intra-op threads only add contention on a shared CPU (10x slower under load).

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
