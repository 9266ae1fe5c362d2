import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; extra intra-op threads only contend on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
