"""The shipped systemd units verify cleanly, with the paths the documented install creates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
ANALYZE = shutil.which("systemd-analyze")


def fake_root(root: Path, units: list[str]) -> Path:
    """A file-system root holding what docs/OPERATIONS.md installs: the units in
    /etc/systemd/system and every ExecStart*/ExecReload executable (the venv's
    /opt/linkd/bin/linkd among them)."""
    system = root / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    shipped = Path("/usr/lib/systemd/system")      # sysinit.target and friends
    if shipped.is_dir():
        shutil.copytree(shipped, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    for unit in units:
        text = (UNITS / unit).read_text()
        (system / unit).write_text(text)
        for command in re.findall(r"^Exec\w+=[+!@:-]*(\S+)", text, re.M):
            target = root / command.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("#!/bin/sh\n")
            os.chmod(target, 0o755)
    return system


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit,instance", [("linkd.service", "linkd.service"),
                                           ("linkd@.service", "linkd@site.service")])
def test_systemd_analyze_verify_is_clean(tmp_path: Path, unit: str, instance: str) -> None:
    system = fake_root(tmp_path, [unit])
    if unit != instance:
        (system / instance).symlink_to(system / unit)
    result = subprocess.run([str(ANALYZE), "verify", f"--root={tmp_path}", "--man=no",
                             str(system / instance)], capture_output=True, text=True,
                            timeout=60)
    # Anything said about our unit is a finding (unknown keys are only warnings).
    findings = [line for line in result.stderr.splitlines() if "linkd" in line]
    assert result.returncode == 0 and not findings, result.stderr


def test_exec_start_is_the_documented_venv() -> None:
    docs = (UNITS.parent / "docs" / "OPERATIONS.md").read_text()
    for unit in ("linkd.service", "linkd@.service"):
        start = re.search(r"^ExecStart=(\S+)", (UNITS / unit).read_text(), re.M)
        assert start is not None and start.group(1) == "/opt/linkd/bin/linkd"
    assert "python3 -m venv /opt/linkd" in docs and "/etc/sysusers.d/linkd.conf" in docs


def test_units_set_resource_limits() -> None:
    for unit in ("linkd.service", "linkd@.service"):
        text = (UNITS / unit).read_text()
        for key in ("LimitNOFILE=", "MemoryMax=", "TasksMax="):
            assert re.search(rf"^{key}\S+", text, re.M), (unit, key)


def test_man_pages_and_completion_are_current(tmp_path: Path) -> None:
    """docs/man and docs/completion are generated from the parsers: regenerate them
    (python -m linkd.tools.docs) whenever an option changes."""
    pytest.importorskip("build_manpages")
    pytest.importorskip("shtab")
    from linkd.tools import docs
    assert docs.main([str(tmp_path)]) == 0
    for sub in ("man", "completion"):
        for made in (tmp_path / sub).iterdir():
            committed = UNITS.parent / "docs" / sub / made.name
            assert committed.read_text() == made.read_text(), \
                f"{committed} is stale: run python -m linkd.tools.docs"
    assert "--print-config" in (UNITS.parent / "docs" / "man" / "linkd.8").read_text() \
        .replace("\\-", "-")
