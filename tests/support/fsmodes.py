"""Whether file modes bind this process (they do not for root with CAP_DAC_OVERRIDE)."""

from pathlib import Path


def modes_are_enforced(tmp_path: Path) -> bool:
    """False when we bypass file modes (root with CAP_DAC_OVERRIDE)."""
    probe = tmp_path / ".mode-probe"
    probe.write_text("")
    probe.chmod(0)
    try:
        probe.read_text()
    except PermissionError:
        return True
    finally:
        probe.unlink()
    return False
