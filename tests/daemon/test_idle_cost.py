"""An idle hub costs little (issue 13: 200 idle peers <= 3 % of a core).

What each idle peer used to cost, counted (never timed):
* the outage watch read its status every second while connected;
* housekeeping listed its failed/ and quarantine/ folders every two seconds,
  one thread hop per peer, though only linkd puts files there (and counts them).
Pick-up rescans are in test_pickup_watch.py.
"""

from __future__ import annotations

import datetime as dt
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
    with trio.move_on_after(60):
        await outage_watch(link)
    assert len(reads) <= 13, len(reads)             # every 5 s, not every second


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
    """What Daemon.refresh_folder_counts reads: its links."""
    def __init__(self, links: list[Any]) -> None:
        self.links = {link.name: link for link in links}


async def test_housekeeping_recounts_only_links_with_files_to_count(tmp_path, monkeypatch):
    ca = trustme.CA()
    names = [f"p{i}" for i in range(5)]
    cfg = node_config(tmp_path, ca, "hub", [peer_config(n) for n in names])
    links = [make_link(cfg, n) for n in names]
    counted: list[list[str]] = []
    real = daemonmod._folder_counts

    def counting(layout: Any, channels: list[str]) -> Any:
        counted[-1].append(layout.peer)
        return real(layout, channels)
    monkeypatch.setattr(daemonmod, "_folder_counts", counting)
    fake = _Daemon(links)
    failed = links[2].layout.failed_dir("data")
    failed.mkdir(parents=True, exist_ok=True)
    (failed / "bad.txt").write_bytes(b"x")

    counted.append([])
    await daemonmod.Daemon.refresh_folder_counts(fake)             # start: every link
    assert sorted(counted[-1]) == names
    assert links[2].status.channels["data"].failed == 1

    counted.append([])
    await daemonmod.Daemon.refresh_folder_counts(fake, only_nonzero=True)
    assert counted[-1] == ["p2"]                                   # only the one with files

    (failed / "bad.txt").unlink()                                  # the operator removed it
    counted.append([])
    await daemonmod.Daemon.refresh_folder_counts(fake, only_nonzero=True)
    assert counted[-1] == ["p2"] and links[2].status.channels["data"].failed == 0

    links[4].status.channel("data").failed += 1                    # linkd failed a file
    counted.append([])
    await daemonmod.Daemon.refresh_folder_counts(fake, only_nonzero=True)
    assert counted[-1] == ["p4"]
