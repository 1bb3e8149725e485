import pytest


@pytest.fixture(params=["unigem", "edm"])
def kind(request):
    """Runs a test for both models."""
    return request.param


@pytest.fixture
def single_thread():
    """Tiny models gain nothing from intra-op threads, and spinning threads slow down badly on a busy machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
