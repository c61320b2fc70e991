"""An idle hub costs little (issue 13: 200 idle peers <= 3 % of a core).

What each idle peer used to cost, counted (never timed):
* the outage watch read its status every second while connected (then every 5 s;
  now it sleeps until the state changes);
* housekeeping listed its failed/ and quarantine/ folders every two seconds,
  one thread hop per peer, though only linkd puts files there (and counts them).
Pick-up rescans are in test_pickup_watch.py.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing
import trustme
from memlink import make_link, node_config, peer_config

import linkd.daemon as daemonmod
from linkd.net import supervisor
from linkd.net.supervisor import outage_watch
from linkd.status import PeerStatus


async def test_a_connected_link_is_not_polled_every_second(
        autojump_clock: trio.testing.MockClock) -> None:
    reads = []

    class Link:
        name = "bravo"
        _status = PeerStatus("bravo", "connected", dt.datetime.now(dt.UTC))

        @property
        def status(self) -> PeerStatus:
            reads.append(trio.current_time())
            return self._status
    link = Link()
    link._status.set_state("connected")
    with trio.move_on_after(59):
        await outage_watch(link)
    # once to learn it is up, then asleep until its state changes (was: every 5 s)
    assert len(reads) <= 2, len(reads)
    assert link._status.listeners == []             # the task left no listener behind


async def test_a_link_that_goes_down_is_still_reported_on_time(
        autojump_clock: trio.testing.MockClock, monkeypatch) -> None:
    """Noticing the outage up to 5 s late does not move the first line (10 s)."""
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    class Clock(dt.datetime):          # wall time that follows the mock clock
        @classmethod
        def now(cls, tz: Any = None) -> dt.datetime:  # type: ignore[override]
            return base + dt.timedelta(seconds=trio.current_time())
    monkeypatch.setattr(supervisor, "dt", SimpleNamespace(
        datetime=Clock, UTC=dt.UTC, timedelta=dt.timedelta))
    lines: list[dict[str, Any]] = []

    class Link:
        name = "bravo"
        status = PeerStatus("bravo", "connected", dt.datetime.now(dt.UTC))

        class log:  # noqa: N801 - stands in for a bound logger
            @staticmethod
            def warning(event: str, **kw: Any) -> None:
                lines.append({"event": event, "at": trio.current_time(), **kw})
    link = Link()
    link.status.set_state("connected")

    async def go_down() -> None:
        await trio.sleep(7.5)
        link.status.set_state("backoff")
        link.status.down_since = Clock.now(dt.UTC)
    start = trio.current_time()
    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(go_down)
            nursery.start_soon(outage_watch, link)
    assert [e["event"] for e in lines] == ["link_still_down"]
    assert 17.5 <= lines[0]["at"] - start <= 18.5, lines   # down at 7.5 s, + 10 s
    assert round(lines[0]["down_for_s"]) == 10


class _Daemon:
    """What Daemon.refresh_folder_counts reads: its links and what it last counted."""
    def __init__(self, links: list[Any]) -> None:
        self.links = {link.name: link for link in links}
        self._folder_seen: dict[str, Any] = {}


def _settle(folder: Path) -> None:
    """Age a folder's mtime past SETTLED_NS, as two idle seconds would."""
    st = folder.stat()
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns - 10 * daemonmod.SETTLED_NS))


async def test_housekeeping_lists_only_folders_that_changed(tmp_path, monkeypatch):
    """The periodic recount lists a failed/ or quarantine/ folder only when it changed
    (inode or mtime): a hand-moved file, a recovery's move or a removal is counted
    on the next pass; an idle hub lists nothing."""
    ca = trustme.CA()
    names = [f"p{i}" for i in range(4)]
    cfg = node_config(tmp_path, ca, "hub", [peer_config(n) for n in names])
    links = [make_link(cfg, n) for n in names]
    listed: list[str] = []
    real = daemonmod.count_files

    def counting(folder: Path) -> int:
        listed.append(str(folder))
        return real(folder)
    monkeypatch.setattr(daemonmod, "count_files", counting)
    fake = _Daemon(links)
    refresh = daemonmod.Daemon.refresh_folder_counts
    folders = [f for link in links for f in (link.layout.failed_dir("data"),
                                              link.layout.quarantine_dir())]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
        _settle(f)

    await refresh(fake, changed_only=True)              # the first pass lists all
    assert len(listed) == len(folders)
    listed.clear()
    await refresh(fake, changed_only=True)              # idle: lists nothing
    assert listed == []

    failed = links[2].layout.failed_dir("data")
    (failed / "by-hand.bin").write_bytes(b"x")          # an operator moved one in
    await refresh(fake, changed_only=True)
    assert listed == [str(failed)] and links[2].status.channels["data"].failed == 1

    _settle(failed)
    listed.clear()
    await refresh(fake, changed_only=True)
    assert listed == [str(failed)]                      # changed since: mtime moved back
    listed.clear()
    await refresh(fake, changed_only=True)
    assert listed == []

    (failed / "by-hand.bin").unlink()                   # ... and removed it
    await refresh(fake, changed_only=True)
    assert links[2].status.channels["data"].failed == 0


async def test_a_file_failed_while_counting_is_counted_next_pass(tmp_path, monkeypatch):
    """The recount's thread hop lists failed/ just before pick-up puts a file there:
    the folder's mtime changed, so the next pass lists it again."""
    ca = trustme.CA()
    link = make_link(node_config(tmp_path, ca, "hub", [peer_config("p0")]), "p0")
    fake = _Daemon([link])
    failed = link.layout.failed_dir("data")
    failed.mkdir(parents=True, exist_ok=True)
    real = daemonmod.count_files
    once = [True]

    def racing(folder: Path) -> int:
        n = real(folder)
        if once[0] and folder == failed:
            once[0] = False
            (failed / "big.bin").write_bytes(b"x")      # failed right after the listing
        return n
    monkeypatch.setattr(daemonmod, "count_files", racing)
    await daemonmod.Daemon.refresh_folder_counts(fake, changed_only=True)
    assert link.status.channels["data"].failed == 0     # the stale count, for one pass
    await daemonmod.Daemon.refresh_folder_counts(fake, changed_only=True)
    assert link.status.channels["data"].failed == 1


async def test_housekeeping_checks_a_share_of_a_big_hubs_folders_each_pass(
        autojump_clock: trio.testing.MockClock) -> None:
    """A hub of 200 peers stat()ed its 400+ folders every 2 s (a tenth of its idle
    CPU): each pass now checks at most HOUSEKEEPING_FOLDERS of them, and every folder
    is still checked within a few passes."""
    links = [SimpleNamespace(name=f"p{i:03d}", channels={"data": None}) for i in range(60)]
    passes: list[list[str]] = []

    class Fake:
        def __init__(self) -> None:
            self.links = {link.name: link for link in links}
            self.expiry = SimpleNamespace(check=lambda board: None)
            self.heap_trim = SimpleNamespace(due=lambda: False)
            self.board = None

        async def refresh_folder_counts(self, link: Any = None, *, changed_only: bool = False,
                                        some: Any = None) -> None:
            assert changed_only and link is None
            passes.append([one.name for one in some])
    with trio.move_on_after(3 * daemonmod.HOUSEKEEPING - 0.1):
        await daemonmod.Daemon._housekeeping(Fake())   # type: ignore[arg-type]
    # 60 peers x (1 channel + quarantine/) = 120 folders: three passes of 20 peers
    assert [len(p) for p in passes] == [20, 20, 20]
    assert sorted(n for p in passes for n in p) == sorted(link.name for link in links)
    assert all(2 * len(p) <= daemonmod.HOUSEKEEPING_FOLDERS for p in passes)
