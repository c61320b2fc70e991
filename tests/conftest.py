import pytest
from memlink import inline_thread_hops
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


@pytest.fixture
def inline_threads(monkeypatch):
    """Thread hops inline, for a module under autojump_clock (memlink.inline_thread_hops):
    `pytestmark = pytest.mark.usefixtures("inline_threads")`."""
    inline_thread_hops(monkeypatch)
