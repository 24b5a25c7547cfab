"""Shared by the SVG2 tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one CPU thread: the tiny ops here gain nothing from threads, and on a shared, oversubscribed CPU
    (four agents on two cores) multi-threaded small ops slow down a hundredfold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
