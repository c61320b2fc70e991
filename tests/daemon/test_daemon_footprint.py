"""What the daemon process loads: the memory of an idle daemon is mostly its imports
(docs/PERFORMANCE.md), so a library the daemon does not use must not come along."""

import json
import subprocess
import sys

PROBE = """
import json, sys
from linkd.cli.linkd_main import main
code = main(["-c", sys.argv[1]])
loaded = sorted(name for name, module in sys.modules.items()
                if module is not None and name.split(".")[0] in ("rich", "pygments"))
print(json.dumps({"code": code, "loaded": loaded, "structlog": "structlog" in sys.modules}))
"""


def test_the_daemon_runs_without_rich_and_pygments(tmp_path):
    # structlog imports rich (and pygments) when it is installed, for console tracebacks;
    # linkctl needs rich, the daemon does not: ~3.4 MB of RSS per daemon.
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 1 and result["structlog"]    # it got as far as the daemon
    assert result["loaded"] == []


def test_linkctl_still_has_rich():
    out = subprocess.run([sys.executable, "-c", "import linkd.cli.send_cmd, rich.progress"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
