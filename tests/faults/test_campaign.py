"""The operator-fault campaign (issue 7): two real daemons, a seeded random schedule of
operator and resource faults, then an account of every file handed over.

alpha (run under `prlimit --nofile=128:128`) dials bravo through tcpproxy.Proxy and
sends on four channels: `urgent` (priority 10), `misc` (5), `late` (3; at first only
alpha has it: held until bravo adds it) and `bulk` (0; the big files). bravo has
`archive_sent = true` (irrelevant to this direction: it must change nothing).
A dropper thread hands over files the Maildir way (write aside, rename in), and ~5 % are
written in place, straight into out/<ch>/ in several chunks with pauses (like `cp`).
Meanwhile the schedule, drawn from the seed, applies one fault at a time:

  kill / term      SIGKILL or SIGTERM of either side, restart (a state backup is taken
                   now and then while it is down)
  wipe             state_dir deleted while the daemon is down
  restore          state_dir replaced by an older backup while the daemon is down
  chstate          one channel's state deleted while the daemon is down
  channels         SIGHUP after adding or removing `misc` or `late` on one side
  limits           SIGHUP after switching `bulk`'s max_message_bytes between 16 MiB and
                   1 MiB on one side (and alpha's archive_sent on and off)
  cut / partition  the proxy resets the connection / refuses connections for a while
  stopcont         SIGSTOP of one side for up to 3 s, then SIGCONT
  squeeze          100 idle connections to alpha's status socket for a while, so that
                   with 128 descriptors alpha's spool opens hit EMFILE

Then everything heals (full config on both sides, link up) and the test waits until
every file is accounted for and nothing waits in out/ or queue/. checker.account
then demands, per file: exactly once in bravo's in/ (by SHA-256 and sent name; ~N names
count), or twice and then only with a `duplicate_possible` naming it, or in failed/
with a reason, and that only when `bulk`'s limit was lowered below its size; every
`message_sent` has a `message_delivered` with the same seq and SHA-256; nothing
unexpected in in/. Logs are appended across restarts (procs.Daemon), which the test
checks by counting `started` events.

Seed: printed at the start; LINKD_CAMPAIGN_SEED=<n> replays the same schedule and files
(timings differ). A failure lists the schedule as run and the first unaccounted files
with their events on both sides.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from checker import Handed, account, scan_failed, scan_inbox, untilde
from procs import (
    Daemon,
    copy_state,
    delete_channel_state,
    entries,
    free_port,
    leftovers,
    make_pki,
    restore_state,
    stop_all,
    wait_for,
)
from tcpproxy import Proxy

MiB = 1 << 20
CHANNELS = {"urgent": 10, "misc": 5, "late": 3, "bulk": 0}
NAMES = list(CHANNELS)
NORMAL_LIMIT = 16 * MiB
LOW_LIMIT = 1 * MiB
NOFILE = 128


@dataclasses.dataclass(frozen=True)
class Profile:
    files: int
    drop_seconds: float
    quiesce_timeout: float
    max_size: int


SHORT = Profile(files=700, drop_seconds=20, quiesce_timeout=60, max_size=3 * MiB)
LONG = Profile(files=5000, drop_seconds=150, quiesce_timeout=300, max_size=6 * MiB)


def campaign_seed() -> int:
    return int(os.environ.get("LINKD_CAMPAIGN_SEED") or random.randrange(1 << 32))


@dataclasses.dataclass(frozen=True)
class Plan:
    index: int
    channel: str
    size: int
    in_place: bool

    @property
    def name(self) -> str:
        return f"{self.index:05d}-{'ip' if self.in_place else 'mv'}.bin"


def plan_files(rng: random.Random, profile: Profile) -> list[Plan]:
    plans = []
    for i in range(profile.files):
        roll = rng.random()
        if roll < 0.70:
            size = rng.randint(0, 8 * 1024)
        elif roll < 0.95:
            size = rng.randint(8 * 1024, 128 * 1024)
        else:
            size = rng.randint(128 * 1024, profile.max_size)
        if size > 128 * 1024:
            channel = "bulk"
        else:
            channel = rng.choices(NAMES, weights=[3, 2, 1, 4])[0]
        plans.append(Plan(i, channel, size, rng.random() < 0.05))
    return plans


class Dropper(threading.Thread):
    """Hands the planned files to alpha over `seconds`: renamed in from a staging folder,
    or (in_place) written straight into out/<ch>/ by a writer thread in chunks."""

    def __init__(self, sender: Daemon, plans: list[Plan], seconds: float, seed: int) -> None:
        super().__init__(name="dropper", daemon=True)
        self.sender, self.plans, self.seconds = sender, plans, seconds
        self.rng = random.Random(seed)
        self.staging = sender.dir / "staging"
        self.handed: list[Handed] = []
        self.lock = threading.Lock()
        self.writers: list[threading.Thread] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            start = time.monotonic()
            for i, plan in enumerate(self.plans):
                due = start + self.seconds * i / len(self.plans)
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())      # pacing, not synchronisation
                data = os.urandom(plan.size)
                out = self.sender.out_dir("bravo", plan.channel)
                handed = Handed(plan.channel, plan.name, _sha(data), plan.size)
                if plan.in_place:
                    pauses = [self.rng.uniform(0.02, 0.4) for _ in range(self.rng.randint(2, 5))]
                    t = threading.Thread(target=self._write_in_place,
                                         args=(out / plan.name, data, pauses), daemon=True)
                    self.writers.append(t)
                    with self.lock:
                        self.handed.append(handed)
                    t.start()
                else:
                    temp = self.staging / plan.name
                    with open(temp, "wb") as f:
                        f.write(data)
                    os.rename(temp, out / plan.name)
                    with self.lock:
                        self.handed.append(handed)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _write_in_place(self, path: Path, data: bytes, pauses: list[float]) -> None:
        try:
            step = max(1, len(data) // (len(pauses) + 1))
            with open(path, "wb") as f:
                done = 0
                for pause in pauses:
                    f.write(data[done:done + step])
                    f.flush()
                    done += step
                    time.sleep(pause)
                f.write(data[done:])
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def finished(self, timeout: float) -> bool:
        self.join(timeout)
        for t in self.writers:
            t.join(max(0.1, timeout))
        return not self.is_alive() and not any(t.is_alive() for t in self.writers)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class Campaign:
    def __init__(self, tmp_path: Path, seed: int, profile: Profile) -> None:
        self.tmp, self.seed, self.profile = tmp_path, seed, profile
        self.rng = random.Random(seed)
        pki_dir = make_pki(tmp_path / "pki", ["alpha", "bravo"])
        self.b = Daemon(tmp_path, "bravo", pki_dir, port=free_port(),
                        link={"archive_sent": True})
        assert self.b.port is not None
        self.proxy = Proxy(self.b.port)
        self.a = Daemon(tmp_path, "alpha", pki_dir,
                        wrap=["prlimit", f"--nofile={NOFILE}:{NOFILE}"])
        self.present = {"alpha": set(NAMES), "bravo": set(NAMES) - {"late"}}
        self.limit = {"alpha": NORMAL_LIMIT, "bravo": NORMAL_LIMIT}      # of `bulk`
        self.lowest_bulk_limit = NORMAL_LIMIT
        self.backups: dict[str, Path] = {}
        self.starts = {"alpha": 0, "bravo": 0}
        self.timeline: list[str] = []
        self.problems: list[str] = []
        self.t0 = time.monotonic()
        self.a.add_peer("bravo", [], connect=self.proxy.address)
        self.b.add_peer("alpha", [])
        self._configure(self.a)
        self._configure(self.b)

    # -- configuration -------------------------------------------------------------

    def _configure(self, d: Daemon) -> None:
        d.peers[0]["channels"] = [
            {"name": ch, "priority": prio,
             "max_message_bytes": self.limit[d.name] if ch == "bulk" else NORMAL_LIMIT}
            for ch, prio in CHANNELS.items() if ch in self.present[d.name]]

    def daemon(self, side: str) -> Daemon:
        return self.a if side == "alpha" else self.b

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:6.1f}s {text}"
        self.timeline.append(line)
        print(line, flush=True)

    # -- process control -----------------------------------------------------------

    def start(self, d: Daemon) -> None:
        d.start()
        self.starts[d.name] += 1

    def check_alive(self) -> None:
        for d in (self.a, self.b):
            if d.proc is not None and d.proc.poll() is not None:
                self.problems.append(f"{d.name} exited on its own with {d.proc.returncode}:\n"
                                     f"{d.tail(15)}")
                self.note(f"{d.name} had exited ({d.proc.returncode}): restarting")
                self.start(d)

    def halt(self, d: Daemon, how: str) -> None:
        if how == "kill":
            d.kill()
            return
        try:
            code = d.stop(signal.SIGTERM, timeout=15)
        except subprocess.TimeoutExpired:
            self.problems.append(f"{d.name} did not stop within 15 s of SIGTERM:\n{d.tail(15)}")
            d.kill()
            return
        if code != 0:
            self.problems.append(f"{d.name} exited with {code} on SIGTERM:\n{d.tail(15)}")

    # -- faults --------------------------------------------------------------------

    def act(self, action: str, side: str) -> None:
        d = self.daemon(side)
        rng = self.rng
        if action in ("kill", "term"):
            self.halt(d, action)
            backup = rng.random() < 0.4
            if backup:
                self.backups[side] = copy_state(d, self.tmp / f"backup-{side}")
            down = rng.uniform(0, 3)
            self.note(f"{action} {side}{' (backup taken)' if backup else ''}, "
                      f"down for {down:.1f}s")
            time.sleep(down)                             # the outage (files pile up)
            self.start(d)
        elif action == "wipe":
            self.halt(d, rng.choice(["kill", "term"]))
            self.note(f"wipe {side}'s state_dir")
            shutil.rmtree(d.state, ignore_errors=True)
            self.start(d)
        elif action == "restore":
            self.halt(d, rng.choice(["kill", "term"]))
            if side in self.backups:
                self.note(f"restore {side}'s state_dir from its older backup")
                restore_state(d, self.backups[side])
            else:
                self.note(f"stop {side}, take a backup (none yet)")
                self.backups[side] = copy_state(d, self.tmp / f"backup-{side}")
            self.start(d)
        elif action == "chstate":
            self.halt(d, rng.choice(["kill", "term"]))
            ch = rng.choice(NAMES)
            removed = delete_channel_state(d, "bravo" if side == "alpha" else "alpha", ch)
            self.note(f"delete {side}'s state of channel {ch}: "
                      f"{[str(p.relative_to(d.state)) for p in removed]}")
            self.start(d)
        elif action == "channels":
            ch = rng.choice(["misc", "late"])
            if ch in self.present[side]:
                self.present[side].discard(ch)
                verb = "remove"
            else:
                self.present[side].add(ch)
                verb = "add"
            self._configure(d)
            self.note(f"SIGHUP {side}: {verb} channel {ch}")
            self._reload(d)
        elif action == "limits":
            low = self.limit[side] == NORMAL_LIMIT
            self.limit[side] = LOW_LIMIT if low else NORMAL_LIMIT
            self.lowest_bulk_limit = min(self.lowest_bulk_limit, self.limit[side])
            extra = ""
            if side == "alpha":
                d.link["archive_sent"] = not d.link.get("archive_sent", False)
                extra = f", archive_sent={d.link['archive_sent']}"
            self._configure(d)
            self.note(f"SIGHUP {side}: bulk max_message_bytes={self.limit[side]}{extra}")
            self._reload(d)
        elif action == "cut":
            n = self.proxy.cut()
            self.note(f"cut the link ({n} connection(s))")
        elif action == "partition":
            seconds = rng.uniform(1, 4)
            self.note(f"partition for {seconds:.1f}s")
            self.proxy.refuse = True
            self.proxy.cut()
            time.sleep(seconds)                          # the fault's duration
            self.proxy.refuse = False
        elif action == "stopcont":
            seconds = rng.uniform(0.5, 3)
            self.note(f"SIGSTOP {side} for {seconds:.1f}s")
            assert d.proc is not None
            d.proc.send_signal(signal.SIGSTOP)
            time.sleep(seconds)                          # the fault's duration
            d.proc.send_signal(signal.SIGCONT)
        elif action == "squeeze":
            seconds = rng.uniform(1, 3)
            held, peak = self.squeeze()
            self.note(f"squeeze alpha's descriptors: {len(held)} idle status connections, "
                      f"alpha at {peak}/{NOFILE} descriptors, for {seconds:.1f}s")
            time.sleep(seconds)                          # the fault's duration
            for s in held:
                s.close()
        else:  # pragma: no cover
            raise AssertionError(action)

    def squeeze(self) -> tuple[list[socket.socket], int]:
        """Connect to alpha's status socket until alpha holds (almost) all the descriptors
        its limit allows (or no more connections are taken): its spool opens then get
        EMFILE until the connections close."""
        held: list[socket.socket] = []
        peak = 0
        pid = self.a.proc.pid if self.a.proc is not None else 0

        def count() -> int:
            try:
                return len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                return 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len(held) < 3 * NOFILE and peak < NOFILE - 1:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(self.a.socket))
            except OSError:
                # the listen backlog is full: give alpha a moment to accept (or to fail
                # with EMFILE, which is the point)
                s.close()
                time.sleep(0.005)
                peak = max(peak, count())
                continue
            held.append(s)
            if len(held) % 8 == 0:
                peak = max(peak, count())
        return held, peak

    def _reload(self, d: Daemon) -> None:
        try:
            d.reload()
        except AssertionError as exc:
            self.problems.append(f"{d.name}: {exc}")

    ACTIONS = {"kill": 3, "term": 2, "wipe": 1, "restore": 1, "chstate": 1, "channels": 2,
               "limits": 2, "cut": 2, "partition": 1, "stopcont": 1, "squeeze": 1}
    SIDED = {"kill", "term", "wipe", "restore", "chstate", "channels", "limits", "stopcont"}

    # -- the run ---------------------------------------------------------------------

    def run(self) -> None:
        plans = plan_files(self.rng, self.profile)
        self.start(self.b)
        self.start(self.a)
        self.a.wait_state("bravo")
        dropper = Dropper(self.a, plans, self.profile.drop_seconds, self.rng.randrange(1 << 32))
        dropper.start()
        self.note(f"dropping {len(plans)} files "
                  f"({sum(p.size for p in plans) / MiB:.1f} MiB, "
                  f"{sum(p.in_place for p in plans)} in place) over "
                  f"{self.profile.drop_seconds:.0f}s")
        names, weights = list(self.ACTIONS), list(self.ACTIONS.values())
        while dropper.is_alive():
            time.sleep(self.rng.uniform(0.3, 1.5))       # the gap between faults
            if not dropper.is_alive():
                break
            self.check_alive()
            action = self.rng.choices(names, weights)[0]
            side = self.rng.choice(["alpha", "bravo"]) if action in self.SIDED else "-"
            self.act(action, side)
        assert dropper.finished(60), "the dropper or a writer did not finish"
        if dropper.error is not None:
            raise AssertionError(f"dropper failed: {dropper.error!r}")
        self.heal()
        self.handed = list(dropper.handed)
        self.wait_quiet()

    def heal(self) -> None:
        self.note("heal: link up, full config on both sides")
        self.proxy.refuse = False
        self.check_alive()
        self.present = {"alpha": set(NAMES), "bravo": set(NAMES)}
        self.limit = {"alpha": NORMAL_LIMIT, "bravo": NORMAL_LIMIT}
        for d in (self.b, self.a):
            self._configure(d)
            self._reload(d)
        try:
            self.a.wait_state("bravo", timeout=60)
        except AssertionError:
            self.problems.append("the link did not come back up within 60 s of healing")

    def settled(self) -> bool:
        if leftovers(self.a, "bravo", NAMES):
            return False
        have: dict[str, set[str]] = {}
        for ch in NAMES:
            found = set()
            for folder in (self.b.in_dir("alpha", ch), self.a.failed_dir("bravo", ch)):
                for entry in entries(folder):
                    found.add(entry)
                    base = untilde(entry)
                    if base is not None:
                        found.add(base)
            have[ch] = found
        return all(h.name in have[h.channel] for h in self.handed)

    def wait_quiet(self) -> None:
        started = time.monotonic()
        try:
            wait_for(self.settled, self.profile.quiesce_timeout, interval=0.5)
            self.note(f"quiet after {time.monotonic() - started:.1f}s")
        except AssertionError:
            self.problems.append(f"not quiet {self.profile.quiesce_timeout:.0f}s after healing "
                                 f"(files missing or still queued)")
            self.note("never quiet")
        for d in (self.a, self.b):
            if d.running:
                self.halt(d, "term")

    def verify(self) -> None:
        for d in (self.a, self.b):
            logged = len(d.events("started"))
            if logged != self.starts[d.name]:
                self.problems.append(f"{d.name}: {self.starts[d.name]} starts but {logged} "
                                     f"`started` events: its log was not kept across restarts")
        quarantined = [f"quarantine/{n}" for n in entries(self.b.spool / "alpha" / "quarantine")]
        partials = [f"tmp/{n}" for n in entries(self.b.spool / "alpha" / "tmp")]
        report = account(
            self.handed, sender="alpha", receiver="bravo",
            inbox=scan_inbox(self.b.spool / "alpha" / "in", NAMES),
            failed=scan_failed(self.a.spool / "bravo" / "failed", NAMES),
            sender_events=self.a.all_events(), receiver_events=self.b.all_events(),
            may_fail=lambda h: h.channel == "bulk" and h.size > self.lowest_bulk_limit,
            leftover=leftovers(self.a, "bravo", NAMES), quarantined=quarantined)
        print(f"\n[campaign] seed={self.seed} {report.summary(limit=0).splitlines()[0]}"
              f" stale partials in bravo's tmp/: {len(partials)}", flush=True)
        if self.problems or not report.valid:
            text = [f"campaign seed {self.seed} (LINKD_CAMPAIGN_SEED={self.seed} replays it)",
                    "schedule as run:", *("  " + line for line in self.timeline)]
            text += [f"campaign problem: {p}" for p in self.problems[:10]]
            if partials:   # not a failure by itself (the contract forbids them in in/ only)
                text.append(f"note: stale partials in bravo's tmp/: {partials[:5]}")
            text.append(report.summary(limit=3))
            pytest.fail("\n".join(text), pytrace=False)

    def close(self) -> None:
        for d in (self.a, self.b):
            if d.proc is not None and d.proc.poll() is None:
                try:
                    d.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
        stop_all(self.a, self.b)
        self.proxy.close()


def run_campaign(tmp_path: Path, profile: Profile, title: str) -> None:
    seed = campaign_seed()
    print(f"\n[{title}] seed={seed} (LINKD_CAMPAIGN_SEED to replay)", flush=True)
    campaign = Campaign(tmp_path, seed, profile)
    started = time.monotonic()
    try:
        campaign.run()
        campaign.verify()
    finally:
        campaign.close()
        print(f"[{title}] {time.monotonic() - started:.1f}s", flush=True)


@pytest.mark.timeout(240)
def test_operator_fault_campaign(tmp_path: Path) -> None:
    """~700 files, ~20 s of faults; ≤ 60 s in all on this machine."""
    run_campaign(tmp_path, SHORT, "campaign")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_operator_fault_campaign_long(tmp_path: Path) -> None:
    """5,000 files, ~150 s of faults."""
    run_campaign(tmp_path, LONG, "campaign-long")

