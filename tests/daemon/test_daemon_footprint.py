"""The daemon's memory footprint (docs/PERFORMANCE.md): an idle daemon is mostly its
imports, so a library it does not use must not come along; and its worker threads share
one malloc arena instead of keeping one each; and the frame buffers a receiver
allocates and frees come back from the heap, not as fresh pages from the kernel."""

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import linkd.cli.linkd_main as entry
limited = []                    # before the daemon (and its threads) existed?
limit = entry.tune_malloc
entry.tune_malloc = lambda: limited.append("linkd.daemon" not in sys.modules) or limit()
code = entry.main(["-c", sys.argv[1]])
loaded = sorted(name for name, module in sys.modules.items()
                if module is not None and name.split(".")[0] in ("rich", "pygments"))
print(json.dumps({"code": code, "loaded": loaded, "structlog": "structlog" in sys.modules,
                  "limited": limited}))
"""


def test_the_daemon_runs_without_rich_and_pygments(tmp_path):
    # structlog imports rich (and pygments) when it is installed, for console tracebacks;
    # linkctl needs rich, the daemon does not: ~3.4 MB of RSS per daemon.
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 1 and result["structlog"]    # it got as far as the daemon
    assert result["loaded"] == []
    assert result["limited"] == [True]      # malloc arenas limited before the daemon ran


def test_linkctl_still_has_rich():
    out = subprocess.run([sys.executable, "-c", "import linkd.cli.send_cmd, rich.progress"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


ARENAS = """
import ctypes, sys, threading
from linkd.cli.linkd_main import tune_malloc
limited = sys.argv[2] == "limit" and tune_malloc()
barrier = threading.Barrier(8)

def work():
    barrier.wait()              # all alive at once: each would get an arena of its own
    for _ in range(20):
        block = bytes(1 << 20)  # malloc'd (not pymalloc) in this thread
        del block

threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
stream = libc.fopen(sys.argv[1].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(limited)
"""


def test_the_daemons_worker_threads_share_one_malloc_arena(tmp_path):
    """glibc gives each allocating thread an arena of its own by default, and keeps what
    a thread frees there; the daemon limits them to two (main + workers)."""
    counts = {}
    for mode in ("limit", "default"):
        info = tmp_path / f"{mode}.xml"
        out = subprocess.run([sys.executable, "-c", ARENAS, str(info), mode],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        counts[mode] = info.read_text().count("<heap nr=")
    assert counts["limit"] <= 2 < counts["default"]


FRAMES = """
import resource, sys
from linkd.cli.linkd_main import tune_malloc
tuned = sys.argv[1] == "tune" and tune_malloc()

def window():
    # a credit window of data frames, each body a buffer of its own (proto/framing.py),
    # touched as decryption fills it, then freed once written
    frames = [bytearray(256 << 10) for _ in range(16)]
    for frame in frames:
        frame[::4096] = bytes(len(frame[::4096]))
    del frames

for _ in range(5):
    window()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    window()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_frame_buffers_are_reused_not_faulted_in_again():
    """50 credit windows of 256 KiB frames: glibc's default thresholds hand most of
    them fresh pages (~64 page faults each); tuned, they are reused from the heap."""
    if any(k == "GLIBC_TUNABLES" or k.startswith("MALLOC_") for k in os.environ):
        pytest.skip("malloc tuned from the environment: the default is not glibc's")
    faults = {}
    for mode in ("tune", "default"):
        out = subprocess.run([sys.executable, "-c", FRAMES, mode],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        tuned, n = out.stdout.split()
        if mode == "tune" and tuned == "False":
            pytest.skip("no glibc mallopt here (tune_malloc() returned False)")
        faults[mode] = int(n)
    assert faults["tune"] < 1000 < 10_000 < faults["default"], faults
