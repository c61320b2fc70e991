import pytest
from procs import make_pair, stop_all


@pytest.fixture
def pair(tmp_path):
    """alpha (dials) and bravo (listens), connected, one channel 'data'; killed afterwards."""
    made = []

    def factory(**kwargs):
        a, b = make_pair(tmp_path, **kwargs)
        made.extend([a, b])
        return a, b

    yield factory
    stop_all(*made)
