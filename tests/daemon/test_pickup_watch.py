"""Pick-up is woken by inotify; the periodic rescan is only a backstop (issue 13).

An idle hub with hundreds of channels must not list every out/ folder every few
seconds (200 idle peers cost 15 % of a core that way). So a channel whose out/
folder is watched is rescanned only every SAFETY_RESCAN seconds, and every way
a file can arrive must make an inotify event the pick-up loop listens to:

* a rename (IN_MOVED_TO), a writer closing (IN_CLOSE_WRITE), and a hard link
  (`ln`, IN_CREATE only: before this change it waited for the rescan);
* lost events (IN_Q_OVERFLOW) wake every channel;
* a replaced out/ folder is watched again at its path.

The daemon holds one inotify instance for all its peers (net/watcher.py).

"Not rescanned" is checked on trio's MockClock, moved by hand past the old
interval; the event tests run in real time with no rescan at all.
"""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing
import trustme
from memlink import drop, make_link, node_config, peer_config
from procs import Daemon, free_port, make_pki, stop_all

import linkd.net.peer as peermod
import linkd.net.watcher as watchmod
from linkd.net.watcher import FolderWatcher
from linkd.spool.outbound_items import CREATED, WRITTEN

inotify_simple = pytest.importorskip("inotify_simple")


def _counting(link, channel):
    """Count the pick-up passes of `channel` (in the trio task, before the thread hop)."""
    spool = link.spools[channel]
    real = spool.examine
    calls = []
    done = trio.Event()
    state = SimpleNamespace(calls=calls, done=done)

    async def examine(*args, **kwargs):
        calls.append(trio.current_time())
        result = await real(*args, **kwargs)
        state.done.set()
        return result
    spool.examine = examine
    return state


async def _settled(state, n):
    """Wait until pass number `n` has finished and every task is blocked again."""
    while len(state.calls) < n or not state.done.is_set():
        await state.done.wait()
        if len(state.calls) < n:
            state.done = trio.Event()
    await trio.testing.wait_all_tasks_blocked(0.05)


def _link(tmp_path):
    ca = trustme.CA()
    return make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")


@pytest.mark.timeout(60)   # the mock clock cannot time out a hang
async def test_an_idle_watched_channel_is_not_rescanned_every_few_seconds(tmp_path, mock_clock):
    link = _link(tmp_path)
    state = _counting(link, "data")
    clock = mock_clock
    async with trio.open_nursery() as nursery:
        await nursery.start(link.pickup)
        await _settled(state, 1)                    # the start-up pass
        clock.jump(peermod.RESCAN_INTERVAL * 5)     # the old code rescanned 5 times here
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert len(state.calls) == 1
        clock.jump(peermod.SAFETY_RESCAN)           # the backstop still runs
        await _settled(state, 2)
        nursery.cancel_scope.cancel()


@pytest.fixture
def no_rescan(monkeypatch):
    """Real time, but no periodic rescan at all: only inotify can wake a channel."""
    monkeypatch.setattr(peermod, "RESCAN_INTERVAL", 3600.0)
    monkeypatch.setattr(peermod, "SAFETY_RESCAN", 3600.0)


async def test_a_hard_link_into_out_is_picked_up_without_a_rescan(tmp_path, no_rescan):
    link = _link(tmp_path)
    state = _counting(link, "data")
    outside = tmp_path / "made-elsewhere.txt"
    outside.write_bytes(b"linked in")
    async with trio.open_nursery() as nursery:
        await nursery.start(link.pickup)
        await _settled(state, 1)
        os.link(outside, link.layout.out_dir("data") / "linked.txt")   # IN_CREATE only
        # (not "pass n+1 settled, then pending()": _settled's idle cushion ends while
        # the claim's fsyncs still run in a thread, and no further pass ever comes)
        await _queued(link, "linked.txt")
        nursery.cancel_scope.cancel()
    assert not (link.layout.out_dir("data") / "linked.txt").exists()


async def test_a_renamed_file_wakes_only_its_channel(tmp_path, no_rescan):
    ca = trustme.CA()
    link = make_link(node_config(tmp_path, ca, "alpha",
                                 [peer_config("bravo", ("data", "other"))]), "bravo")
    data, other = _counting(link, "data"), _counting(link, "other")
    async with trio.open_nursery() as nursery:
        await nursery.start(link.pickup)
        await _settled(data, 1)
        await _settled(other, 1)
        data.done = trio.Event()
        drop(link, "data", "a.txt", b"a")
        with trio.fail_after(10):
            await _settled(data, 2)
        assert len(other.calls) == 1
        nursery.cancel_scope.cancel()


def _event(wd, mask):
    return inotify_simple.Event(wd=wd, mask=mask, cookie=0, name="")


def _subscribed(watcher, names):
    """Subscribe fake watch descriptors 1.. to `watcher`; returns the calls seen."""
    calls = []
    for wd, name in enumerate(names, 1):
        watcher._subs[wd] = [watchmod.Watch(Path("/nowhere"), wd, None,
                                            lambda kind, name=name: calls.append((name, kind)))]
    return calls


@pytest.fixture
def watcher():
    w = FolderWatcher(track_writes=True)
    yield w
    w.close()


def test_lost_events_wake_every_subscriber_once(watcher):
    flags = inotify_simple.flags
    calls = _subscribed(watcher, ["a", "b", "c"])
    watcher.dispatch([_event(2, flags.MOVED_TO), _event(-1, flags.Q_OVERFLOW),
                      _event(2, flags.CLOSE_WRITE)])
    assert sorted(calls) == [("a", "overflow"), ("b", "overflow"), ("c", "overflow")]


def test_a_replaced_out_folder_drops_its_watch_and_says_so(watcher):
    flags = inotify_simple.flags
    calls = _subscribed(watcher, ["a", "b"])
    watcher.dispatch([_event(1, flags.MOVE_SELF), _event(2, flags.MOVED_TO),
                      _event(1, flags.IGNORED)])
    assert calls == [("a", "lost"), ("b", "event")]
    assert list(watcher._subs) == [2]


def test_two_subscribers_of_one_folder_share_its_watch(watcher, tmp_path):
    """The kernel gives one descriptor per folder: a reload that restarts a peer's
    pick-up subscribes again before the old pick-up unsubscribes; the old one's
    removal must not drop the new one's watch."""
    calls = []
    old = watcher.add(tmp_path, lambda kind: calls.append(("old", kind)))
    new = watcher.add(tmp_path, lambda kind: calls.append(("new", kind)))
    assert old.wd == new.wd
    watcher.remove(old)
    watcher.dispatch([_event(new.wd, inotify_simple.flags.MOVED_TO)])
    assert calls == [("new", "event")]
    watcher.remove(new)
    assert watcher._subs == {}


async def test_a_replaced_out_folder_is_watched_again_at_its_path(tmp_path, no_rescan,
                                                                 monkeypatch):
    """An operator moves out/<ch> away and puts a new folder there: files renamed
    into the new folder are picked up (the old watch follows the moved folder,
    so without re-watching they waited for the rescan). Only the watch's
    IN_MOVE_SELF may find the new folder here: no periodic lstat either."""
    monkeypatch.setattr(peermod, "VERIFY_INTERVAL", 3600.0)
    link = _link(tmp_path)
    out = link.layout.out_dir("data")
    fresh = tmp_path / "fresh-out"
    fresh.mkdir()
    fresh.chmod(out.stat().st_mode & 0o7777)
    async with trio.open_nursery() as nursery:
        watcher = FolderWatcher()
        await nursery.start(watcher.run)
        link.watcher = watcher
        await nursery.start(link.pickup)
        await trio.testing.wait_all_tasks_blocked(0.05)
        out.rename(tmp_path / "old-out")             # both before pick-up sees an event
        fresh.rename(out)
        await trio.testing.wait_all_tasks_blocked(0.05)   # the watcher re-watches out/
        watches = [w for subs in watcher._subs.values() for w in subs]
        assert [w.ident for w in watches] == [watchmod.identity(out)]
        drop(link, "data", "after.txt", b"new folder")
        await _queued(link, "after.txt")
        nursery.cancel_scope.cancel()


def test_the_daemon_opens_one_inotify_instance_for_all_its_peers(tmp_path):
    """The kernel allows 128 inotify instances per user by default: one per peer
    left a hub of 200 peers rescanning ~70 of them every two seconds."""
    pki_dir = make_pki(tmp_path / "pki", ["hub", "p1", "p2", "p3", "p4"])
    hub = Daemon(tmp_path, "hub", pki_dir, port=free_port())
    for name in ("p1", "p2", "p3", "p4"):
        hub.add_peer(name, [{"name": "data"}, {"name": "bulk"}])
    try:
        hub.start()
        fds = Path(f"/proc/{hub.proc.pid}/fd")
        kinds = []
        for fd in fds.iterdir():
            try:
                kinds.append(os.readlink(fd))
            except FileNotFoundError:
                pass        # closed since the listing (a worker thread's file)
        assert kinds.count("anon_inode:inotify") == 1, kinds
    finally:
        stop_all(hub)


def test_the_file_system_type_is_read():
    assert watchmod.fs_type(Path("/proc")) == 0x9FA0


@pytest.mark.timeout(60)   # the mock clock cannot time out a hang
async def test_an_out_folder_on_a_network_file_system_is_listed_every_few_seconds(
        tmp_path, monkeypatch, mock_clock):
    """inotify sees only this host's writes: on NFS an application on another host
    renames files into out/ without an event, so such a folder is not watched and
    pick-up lists it every RESCAN_INTERVAL, not every SAFETY_RESCAN."""
    monkeypatch.setattr(watchmod, "fs_type", lambda folder: 0x6969)     # NFS
    link = _link(tmp_path)
    state = _counting(link, "data")
    async with trio.open_nursery() as nursery:
        await nursery.start(link.pickup)
        await _settled(state, 1)
        state.done = trio.Event()
        mock_clock.jump(peermod.RESCAN_INTERVAL)
        await _settled(state, 2)
        nursery.cancel_scope.cancel()


async def _queued(link, name, channel="data"):
    with trio.fail_after(10):
        while name not in [i.name for i in link.outbound[channel].pending()]:  # noqa: ASYNC110
            await trio.sleep(0.02)      # (spool work runs in threads)


async def test_a_reload_restarting_pick_up_keeps_the_watch(tmp_path, no_rescan):
    """A reload that changes a peer's `connect` cancels its pick-up and starts a new
    one at once. When the old one is still in a thread hop (hashing a big file), its
    clean-up ran after the new one had subscribed to the same folder (the kernel
    gives the same watch descriptor) and removed the new one's watch: files then
    waited for the 60 s backstop until the next restart. (Found by review.)"""
    import threading
    link = _link(tmp_path)
    spool = link.spools["data"]
    real = spool.examine
    release = threading.Event()
    entered = trio.Event()
    slow = [True]

    async def examine(*args, **kwargs):
        if slow[0]:
            slow[0] = False
            entered.set()
            await trio.to_thread.run_sync(release.wait, 30)   # uncancellable, like in_thread
        return await real(*args, **kwargs)
    spool.examine = examine
    old_done = trio.Event()

    async def old_pickup(scope):
        with scope:
            async with trio.open_nursery() as inner:
                await inner.start(link.pickup)
        old_done.set()
    async with trio.open_nursery() as nursery:
        watcher = FolderWatcher()
        await nursery.start(watcher.run)
        link.watcher = watcher
        old = trio.CancelScope()
        nursery.start_soon(old_pickup, old)
        await entered.wait()                                  # the old pass is in a thread
        old.cancel()
        await nursery.start(link.pickup)                      # the new pick-up subscribes
        await trio.testing.wait_all_tasks_blocked(0.05)
        release.set()
        await old_done.wait()                                 # the old clean-up has run
        drop(link, "data", "after-reload.txt", b"x")
        await _queued(link, "after-reload.txt")
        nursery.cancel_scope.cancel()


async def test_an_out_folder_replaced_by_renaming_its_parent_is_watched_again(
        tmp_path, no_rescan, monkeypatch):
    """`mv <peer>/out <peer>/out.old; mkdir -p <peer>/out/data` raises no event on the
    watch of out/data (it follows the old folder): a periodic lstat finds another
    folder at the path and pick-up watches and lists that one. (Found by review.)"""
    monkeypatch.setattr(peermod, "VERIFY_INTERVAL", 0.1)
    link = _link(tmp_path)
    out = link.layout.out_dir("data")
    mode = out.stat().st_mode & 0o7777
    async with trio.open_nursery() as nursery:
        await nursery.start(link.pickup)
        await trio.testing.wait_all_tasks_blocked(0.01)     # (under VERIFY_INTERVAL)
        out.parent.rename(out.parent.with_name("out.old"))
        out.mkdir(parents=True)
        out.chmod(mode)
        out.parent.chmod(mode)
        drop(link, "data", "into-new.txt", b"x")
        await _queued(link, "into-new.txt")
        nursery.cancel_scope.cancel()


def _queue_limit() -> int:
    return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())


def _noise(folder: Path, n: int) -> None:
    """n dot-files: IN_CREATE + IN_CLOSE_WRITE each (ignored by pick-up)."""
    for i in range(n):
        with open(folder / f".noise{i}", "wb"):
            pass


async def test_a_folder_replaced_while_events_overflowed_is_watched_again(tmp_path, no_rescan):
    """An event queue overflow can drop the watch's IN_MOVE_SELF: after an overflow,
    pick-up checks that each folder is still the one watched. (Found by review.)"""
    limit = _queue_limit()
    if limit > 100_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many files to overflow it")
    link = _link(tmp_path)
    out = link.layout.out_dir("data")
    mode = out.stat().st_mode & 0o7777
    async with trio.open_nursery() as nursery:
        await nursery.start(link.pickup)
        await trio.testing.wait_all_tasks_blocked(0.05)
        _noise(out, limit // 2 + 50)    # no checkpoint: the watcher cannot read meanwhile
        out.rename(out.with_name("data.old"))
        out.mkdir()
        out.chmod(mode)
        await trio.testing.wait_all_tasks_blocked(0.05)   # the overflow is handled
        drop(link, "data", "into-new.txt", b"x")           # only a new watch sees this
        await _queued(link, "into-new.txt")
        nursery.cancel_scope.cancel()


def test_the_watcher_keeps_the_files_a_writer_holds_open(watcher, tmp_path):
    """Where pick-up gets no lease (another owner's file, no CAP_LEASE), the watch's
    `writing` tells it which files a writer may still hold open (an operator trial:
    a writer pausing longer than the quiet period was claimed truncated)."""
    calls, writing = [], {}
    watcher.add(tmp_path, lambda kind: calls.append(kind), writing)

    def pump():
        watcher.dispatch(watcher._notifier.read(timeout=0))

    fd = os.open(tmp_path / "slow.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    pump()
    assert writing["slow.bin"][1] == CREATED and calls == ["event"]      # created
    os.write(fd, b"part one")
    pump()
    # written: marked, and no one woken for a write (a cp would wake pick-up per write)
    assert writing["slow.bin"][1] == WRITTEN and calls == ["event"]
    os.close(fd)
    pump()
    assert writing == {} and calls == ["event", "event"]
    os.link(tmp_path / "slow.bin", tmp_path / "linked.bin")        # created, never closed
    pump()
    assert writing["linked.bin"][1] == CREATED
    elsewhere = tmp_path.parent / f"{tmp_path.name}-whole.bin"
    elsewhere.write_bytes(b"whole")
    os.rename(elsewhere, tmp_path / "linked.bin")      # a whole file renamed in, over it
    pump()
    assert writing == {}
    fd = os.open(tmp_path / "held.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x")
    pump()
    # events were lost: the marks stay (review: clearing them let a pausing writer's
    # file be taken), and the overflow is marked for pick-up to be careful a while
    watcher.dispatch([_event(-1, inotify_simple.flags.Q_OVERFLOW)])
    assert writing["held.bin"][1] == WRITTEN and "" in writing
    os.close(fd)
