"""The composition root: config -> lock -> listeners -> recovery -> tasks -> READY=1.

Start-up is ordered so that everything that can refuse to start (config,
certificates, the state-dir lock, the listen port, the status socket) runs
before the first log line: a daemon that refuses to start prints exactly one
line (CONTRACT §10). Signals: SIGTERM/SIGINT stop pick-up, say goodbye on
every session and exit 0; SIGHUP re-reads config and certificates (new
sessions use them; peers and channels may come and go; a peer whose settings
changed gets a fresh session so both sides renegotiate channels).

Size: over 400 lines on purpose: it is the composition root, and start-up,
reload and shutdown wire and unwire the same objects in an order that is read
as one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import itertools
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from functools import partial
from pathlib import Path

import trio

from . import __version__, heap, systemd
from . import log as logmod
from .check import startup_problems
from .config import Config, PeerConfig, load_config
from .control import Controller, PauseState, count_files
from .errors import (
    ConfigError,
    LinkdError,
    StartupError,  # noqa: F401 (re-exported)
    StatusSocketError,
)
from .evidence import audit as audit_mod
from .evidence import keys as ekeys
from .evidence import service as evidence
from .expiry import ExpiryWatch, tls_dates
from .metrics import tls_refusal_kind
from .net.admission import Gate, Limits, serve_listener
from .net.connection import SessionRunner
from .net.peer import PeerLink, in_thread
from .net.supervisor import BYE_SHUTDOWN, dial_loop, handle_inbound, outage_watch
from .net.tls import TLSContexts, make_contexts
from .net.watcher import FolderWatcher
from .spool import LockHandle, SpoolLayout, lock_spool_dir, lock_state_dir
from .status import (
    StatusBoard,
    open_metrics_listener,
    serve_metrics,
    serve_status,
)

STOP_GRACE = 5.0
HOUSEKEEPING = 2.0          # seconds between recounts of failed/ and quarantine/
HOUSEKEEPING_FOLDERS = 50   # folders one recount pass checks (more: a share each pass)
QUEUE_CHUNK = 500           # queue entries listed and encoded per thread hop (GET /queue)
# Goodbye reasons a peer's dialler takes as "back at once, redial now" (supervisor.py).
BYE_RELOAD = "reload: configuration reloaded, redial at once"
BYE_RENEWED = "reload: our certificate was renewed, redial at once"


def _heartbeat(cfg: Config) -> tuple[float, float]:
    """The [link] settings a session takes when it starts (the rest apply live)."""
    return cfg.link.heartbeat_interval, cfg.link.heartbeat_timeout


async def close_side_by_side(sessions: list[tuple[SessionRunner, str]],
                             error: bool = False) -> None:
    """Say goodbye to these sessions at once (each waits for its peer to close)."""
    async with trio.open_nursery() as nursery:
        for runner, reason in sessions:
            nursery.start_soon(partial(runner.close, reason, error=error))


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.log = logmod.get(node=cfg.node.name)
        self.board = StatusBoard(cfg.node.name, __version__)
        self.links: dict[str, PeerLink] = {}
        self.link_scopes: dict[str, trio.CancelScope] = {}
        self.tls: TLSContexts = make_contexts(cfg)
        self.nursery: trio.Nursery | None = None
        self.stopping = False
        self.reload_lock = trio.Lock()
        self.reload_scope = trio.CancelScope()   # the running reload; shutdown cancels it
        self.pauses: PauseState | None = None    # loaded once state_dir is locked
        # each accept loop's own scope: cancelled, it closes its listening socket and
        # lets the sessions it accepted go on (shutdown says goodbye to them first)
        self.accepting: set[trio.CancelScope] = set()
        self.expiry = ExpiryWatch(self.log)
        self.heap_trim = heap.IdleTrim()  # give the heap back once quiet (heap.py)
        self.board.cert_not_after, self.board.crl_next_update = tls_dates(cfg)
        self._stop_observing = logmod.add_observer(self._observe)
        # Bounds on unauthenticated connections, from the descriptor limit at start.
        self.gate = Gate(Limits.from_rlimit())
        self.watcher: FolderWatcher | None = None   # opened by serve: one inotify instance
        self._folder_seen: FolderSeen = {}          # failed/ and quarantine/ as last counted

    def _observe(self, event: Mapping[str, object]) -> None:
        """Count TLS refusals for /metrics from the very events the audit log gets."""
        if event.get("event") == "tls_refused":
            self.board.note_tls_refusal(tls_refusal_kind(str(event.get("reason", ""))))

    # -- peers ------------------------------------------------------------------

    def _make_link(self, peer: PeerConfig) -> PeerLink:
        status = self.board.add_peer(peer.name, [c.name for c in peer.channels],
                                     "connecting" if peer.connect else "waiting")
        link = PeerLink(self.cfg, peer, status)
        link.watcher = self.watcher
        link.layout.spool_group = self.cfg.node.spool_group
        name = peer.name
        link.is_paused = lambda channel: self.pauses is not None and \
            self.pauses.is_paused(name, channel)
        self.links[peer.name] = link
        self._show_paused(link.name)
        return link

    async def queue_chunks(self, peer: str | None = None,
                           channel: str | None = None) -> AsyncIterator[bytes]:
        """Every queued file (GET /queue, `linkctl queue`) as one JSON array, oldest
        first per channel, in pieces of QUEUE_CHUNK entries, each listed and encoded
        in a thread hop: a queue of 100,000 neither stalls the event loop nor is held
        in memory at once (CONTRACT §6, bounded memory)."""
        links = [link for name, link in list(self.links.items()) if peer is None or name == peer]
        entries = (e for link in links for e in link.iter_queue_entries(channel))

        def encode_next() -> bytes:
            part = list(itertools.islice(entries, QUEUE_CHUNK))
            return ",".join(json.dumps(e) for e in part).encode()
        yield b"["
        first = True
        while True:
            text = await in_thread(encode_next)
            if not text:
                break
            yield text if first else b"," + text
            first = False
        yield b"]\n"

    def on_pause_changed(self, peer: str) -> None:
        """The pause controller changed `peer`'s pauses: a resumed channel sends now."""
        link = self.links.get(peer)
        if link is not None:
            link.wake_sender()

    def _show_paused(self, peer: str) -> None:
        status = self.board.peers.get(peer)
        if status is None or self.pauses is None:
            return
        status.paused = self.pauses.peer_paused(peer)
        for name, channel in status.channels.items():
            channel.paused = self.pauses.is_paused(peer, name)

    async def _run_link(self, link: PeerLink,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self.link_scopes[link.name] = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(link.pickup)
                if link.peer.connect is not None:
                    nursery.start_soon(dial_loop, self, link)
                nursery.start_soon(outage_watch, link)
                task_status.started()

    # -- lifecycle --------------------------------------------------------------

    async def serve(self) -> None:
        cfg = self.cfg
        lock = lock_state_dir(cfg.node.state_dir)
        spool_lock: LockHandle | None = None
        try:
            # The spool too: a second daemon with its own state_dir (a copied config)
            # would claim from the same out/ into the same queue/ (layout.lock_spool_dir).
            spool_lock = lock_spool_dir(cfg.node.spool_dir)
            try:
                self.pauses = PauseState(cfg.node.state_dir)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
            self.pauses.subscribe(lambda peer, _channel, _paused: self._show_paused(peer))
            try:
                audit = await in_thread(evidence.open_audit, cfg)   # docs/EVIDENCE.md
                self.board.audit_problem = audit.refusal
            except (OSError, ValueError) as exc:
                raise StartupError(f"cannot open the audit log in {cfg.node.state_dir}/audit: "
                                   f"{exc} (check state_dir and the key)") from None
            await self._serve()
        finally:
            self._stop_observing()
            evidence.close_audit()
            if spool_lock is not None:
                spool_lock.release()
            lock.release() if hasattr(lock, "release") else None

    async def _serve(self) -> None:
        cfg = self.cfg
        listeners: list[trio.SocketListener] = []
        if cfg.listen is not None:
            try:
                listeners = await trio.open_tcp_listeners(cfg.listen.port,
                                                          host=cfg.listen.address)
            except OSError as exc:
                where = f"{cfg.listen.address}:{cfg.listen.port}"
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(f"cannot listen on {where}: port {cfg.listen.port} is "
                                       "already in use (stop the other program or change "
                                       "[listen].port)") from None
                raise StartupError(f"cannot listen on {where}: {exc.strerror or exc} "
                                   "(check [listen].address and [listen].port)") from None
        metrics: list[trio.SocketListener] = []
        if cfg.status.metrics_listen is not None:
            try:
                metrics = await open_metrics_listener(*cfg.status.metrics_listen)
            except StatusSocketError as exc:
                raise StartupError(str(exc)) from None
        watcher = self.watcher = FolderWatcher()   # one inotify instance for every peer
        for peer in cfg.peers:
            self._make_link(peer)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                # Folders and recovery first: once /healthz answers, the spool is there.
                audit = audit_mod.current()
                tail = await in_thread(audit.tail) if audit is not None else None
                for link in self.links.values():
                    problems = await in_thread(link.prepare)
                    for problem in problems:
                        self.log.warning("recovery", peer=link.name, problem=problem)
                    for ch, queued, waiting in await in_thread(link.left_behind):
                        link.status.left_behind[ch] = queued + waiting
                        # a channel removed with files in it: said at the reload, and
                        # again at every start (an operator trial found them forgotten)
                        self.log.warning("channel_removed", peer=link.name, channel=ch,
                                         queued=queued, waiting=waiting, reason=(
                            f"channel {ch} is not configured, and {queued + waiting} "
                            f"file(s) wait in its folders under {link.layout.peer_dir}: "
                            f"configure it again to send them, or move them away"))
                    if tail is not None:    # every delivery since the tail began has its line
                        link.reconcile_audit(tail, await in_thread(link.journaled))
                    await link.log_recovered()
                    link.refresh_queued()       # the counts are right from READY on
                await nursery.start(serve_status, self.board, cfg.node.status_socket,
                                    Controller(self))
                if metrics:
                    await nursery.start(serve_metrics, self.board, metrics)
                nursery.start_soon(self._accept_all, listeners)
                await nursery.start(watcher.run)
                for link in self.links.values():
                    await nursery.start(self._run_link, link)
                limits = self.gate.limits
                self.log.info("started", version=__version__, peers=len(self.links),
                              listen=(f"{cfg.listen.address}:{cfg.listen.port}"
                                      if cfg.listen else None),
                              nofile=limits.nofile, unauthenticated_max=limits.total,
                              unauthenticated_per_source=limits.per_source)
                systemd.ready(f"serving {len(self.links)} peer(s)")
                nursery.start_soon(systemd.watchdog_loop, lambda: True)
                nursery.start_soon(self._status_loop)
                nursery.start_soon(self._housekeeping)
                nursery.start_soon(evidence.audit_loop, self)
                async for signum in sigs:
                    if signum == signal.SIGHUP:
                        # In its own task: a SIGTERM during a long reload is not delayed.
                        nursery.start_soon(self._reload_task)
                    else:
                        self.stopping = True
                        self.reload_scope.cancel()
                        await self.shutdown(signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break
        logmod.flush_suppressed(force=True)
        self.log.info("stopped")

    def summary(self) -> str:
        """One line for systemd's STATUS=: how many peers are up, what is queued."""
        up = sum(1 for p in self.board.peers.values() if p.state == "connected")
        queued = sum(c.queued for p in self.board.peers.values() for c in p.channels.values())
        down = [p.name for p in self.board.peers.values() if p.state != "connected"]
        text = f"{up}/{len(self.board.peers)} peers connected, {queued} queued"
        return text + (f"; down: {', '.join(down[:5])}" if down else "")

    async def _status_loop(self) -> None:
        if not systemd.watchdog_interval() and not systemd.notify("STATUS=" + self.summary()):
            return      # not under systemd: nothing to tell
        while True:
            await trio.sleep(5)
            systemd.status(self.summary())

    async def _accept_all(self, listeners: list[trio.SocketListener]) -> None:
        """The accept loops of the current [listen]; a reload that rebinds stops them
        accepting (closing the old sockets; this returns when the sessions they
        accepted have ended) and starts new ones."""
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept, listener)

    async def refresh_folder_counts(self, link: PeerLink | None = None, *,
                                    changed_only: bool = False,
                                    some: list[PeerLink] | None = None) -> None:
        """Recount failed/<ch>/ and quarantine/ from the folders (CONTRACT §6: they
        survive a restart, and a file retried, removed, moved in by hand or by a
        recovery changes the count), all links in one thread hop. `changed_only`
        (the periodic pass) lists only folders whose inode or mtime changed since
        they were last counted (or changed too recently for the mtime to tell): a
        hub of hundreds of idle peers must not list their folders every 2 s."""
        links = [link] if link is not None else some if some is not None \
            else list(self.links.values())
        seen = self._folder_seen if changed_only else None
        counts = await in_thread(lambda: [_folder_counts(one.layout, list(one.channels), seen)
                                          for one in links])
        for one, (failed, quarantined) in zip(links, counts, strict=True):
            one.status.quarantined = quarantined
            for name, n in failed.items():
                if name in one.status.channels:
                    one.status.channels[name].failed = n

    async def _housekeeping(self) -> None:
        turn = 0
        while True:
            # At most HOUSEKEEPING_FOLDERS folders a pass: a hub of 200 peers checks
            # each peer's folders every ~16 s, a site of a few peers every pass.
            links = list(self.links.values())
            folders = sum(len(one.channels) + 1 for one in links)
            slices = max(1, -(-folders // HOUSEKEEPING_FOLDERS))
            size = -(-len(links) // slices)
            start = (turn % slices) * size
            turn += 1
            await self.refresh_folder_counts(changed_only=True,
                                             some=links[start:start + size])
            self.expiry.check(self.board)
            logmod.flush_suppressed()       # the log_suppressed summary, when due
            if self.heap_trim.due():
                await in_thread(heap.trim)  # after a busy period: RSS back from its peak
            await trio.sleep(HOUSEKEEPING)

    async def _accept(self, listener: trio.SocketListener) -> None:
        # EMFILE & co: one (rate-limited) line and a short wait, never a traceback;
        # unauthenticated connections are bounded by self.gate (net/admission.py).
        accepting = trio.CancelScope()
        self.accepting.add(accepting)
        try:
            await serve_listener(listener, partial(handle_inbound, self), self.log, "[listen]",
                                 accepting)
        finally:
            self.accepting.discard(accepting)

    async def _reload_task(self) -> None:
        async with self.reload_lock:
            if self.stopping:
                return
            with trio.CancelScope() as self.reload_scope:
                await self.reload()

    async def shutdown(self, why: str) -> None:
        self.stopping = True
        systemd.stopping()
        self.log.info("stopping", signal=why)
        # No new connections from here on: a peer told goodbye redials at once, and
        # one accepted now would be cut mid-handshake when we exit (it logged
        # tls_refused, "connection reset"); refused by the kernel, it backs off.
        for accepting in self.accepting:
            accepting.cancel()
        await evidence.checkpoint_and_send(self, "stopping")   # witnessed before the bye
        with trio.move_on_after(STOP_GRACE):
            # The goodbyes go out while the sessions still run: each reads on until its
            # peer closes its end (SessionRunner.close). A session that a dialler runs
            # lives in its link's scope, so that scope is cancelled only after the
            # sessions are over (and have logged their link_down): cut first, it closed
            # with the peer's bytes unread, the kernel reset the connection, and the
            # peer, its goodbye dropped with the reset, logged an unclean link_down.
            # Meanwhile the dial loops do not dial again, and a session whose handshake
            # was under way is refused when it asks for its slot (run_session).
            await close_side_by_side([(link.active, BYE_SHUTDOWN)
                                      for link in self.links.values()
                                      if link.active is not None])
            for link in self.links.values():
                await link.wait_idle()
        for scope in self.link_scopes.values():
            scope.cancel()   # stops pick-up (and dialling)

    async def reload(self) -> None:
        systemd.reloading()
        try:
            cfg = await in_thread(load_config, self.cfg.path)
            problems = await in_thread(startup_problems, cfg)
            # An expired CRL does not keep the old one in force: it is loaded and fails
            # closed (OpenSSL refuses every new handshake: "CRL has expired"), logged.
            crl_expired = [p for p in problems if CRL_EXPIRED in p]
            problems = [p for p in problems if CRL_EXPIRED not in p]
            if problems:
                raise ConfigError(problems[0])
            for section, now, was in (("node", cfg.node, self.cfg.node),
                                      ("status", cfg.status, self.cfg.status)):
                if now != was:
                    keys = ", ".join(f.name for f in dataclasses.fields(now)
                                     if getattr(now, f.name) != getattr(was, f.name))
                    raise ConfigError(f"[{section}] {keys} cannot change on reload: restart "
                                      f"linkd (or put the old value back)")
            tls = make_contexts(cfg)
            signer = await in_thread(ekeys.Signer.from_files, cfg.tls.cert, cfg.tls.key)
            listeners = await self._rebind(cfg)
        except (LinkdError, OSError) as exc:
            self.log.error("reload_failed", reason=str(exc))
            systemd.ready("reload failed; running with the previous configuration")
            return
        old = self.cfg
        self.cfg, self.tls = cfg, tls
        self.board.cert_not_after, self.board.crl_next_update = tls_dates(cfg)
        # A new certificate (a renewal): checkpoints are signed by its key from here on
        # (receipts are signed by the key of the session's own certificate).
        renewed = await evidence.renew_signer(self, signer)
        if crl_expired:
            self.log.error("crl_expired", reason=f"{crl_expired[0]}; new sessions are refused "
                                                 "until a fresh CRL is loaded (SIGHUP)")
        await self._close_revoked(cfg)
        if listeners is not None:
            # The old sockets close; the sessions accepted on them go on (cancelling
            # the old accept loops' whole scope cut them without a goodbye).
            for accepting in list(self.accepting):
                accepting.cancel()
            assert self.nursery is not None
            self.nursery.start_soon(self._accept_all, listeners)
            self.log.info("listen_changed", listen=(f"{cfg.listen.address}:{cfg.listen.port}"
                                                    if cfg.listen else None))
        assert self.nursery is not None
        new_names = {p.name for p in cfg.peers}
        # Sessions to end are closed side by side once they are all known: each goodbye
        # waits (up to a second) for its peer to close its end, so one after the other a
        # hub of many peers would take that many round trips to reload.
        closing: list[tuple[SessionRunner, str]] = []
        ended: list[trio.CancelScope] = []          # removed peers' link scopes
        redial: list[PeerLink] = []                 # links whose connect changed
        for name in list(self.links):
            if name not in new_names:
                link = self.links.pop(name)
                link.removed = True
                if link.active is not None:
                    closing.append((link.active, "peer removed from the configuration"))
                ended.append(self.link_scopes.pop(name))
                self.board.remove_peer(name)
        for peer in cfg.peers:
            existing = self.links.get(peer.name)
            if existing is None:
                link = self._make_link(peer)
                await in_thread(link.prepare)
                link.refresh_queued()
                await self.nursery.start(self._run_link, link)
                continue
            link = existing
            before = old.peer(peer.name)
            link.cfg = cfg
            link.apply_limits()             # changed limits apply to existing channels too
            if before != peer:
                await link.reconfigure(cfg, peer)
                self.board.sync_channels(peer.name, [c.name for c in peer.channels])
                self._show_paused(peer.name)
            # A changed peer, or heartbeat (set when a session starts), needs a new
            # session; priority_hold applies to the live one at its next step.
            if (before != peer or _heartbeat(old) != _heartbeat(cfg)) \
                    and link.active is not None:
                closing.append((link.active, BYE_RELOAD))
            if before != peer and (before is None or before.connect != peer.connect) \
                    and peer.connect:
                redial.append(link)
        if renewed:
            # The peer checks our receipts and checkpoints with the certificate of the
            # session: one still running under the old certificate refused every
            # checkpoint signed by the new key (an operator trial: audit_witness_refused
            # until a restart). A new session shows the peer the new one.
            ending = {id(runner) for runner, _ in closing}
            closing += [(link.active, BYE_RENEWED) for link in self.links.values()
                        if link.active is not None and id(link.active) not in ending]
        await close_side_by_side(closing)
        # A session ended by its goodbye logs its link_down in the task that ran it,
        # within the link's scope: cancelled at once, that line was lost (an operator
        # trial: a reload changing `connect` logged no link_down, in the audit log
        # neither). Wait for those sessions to have said how they ended.
        cut = {link.name for link in redial} | {r.link.name for r, _ in closing
                                                 if r.link.removed}
        with trio.move_on_after(STOP_GRACE):
            for runner, _ in closing:
                if runner.link.name in cut:
                    await runner.reported.wait()
        # what the ended sessions did on their way out (a transfer in flight shows its
        # progress) may have shown a channel the reload removed again: drop it
        for peer in cfg.peers:
            if peer.name in self.links and peer.name in self.board.peers:
                self.board.sync_channels(peer.name, [c.name for c in peer.channels])
        for scope in ended:
            scope.cancel()
        for link in redial:
            self.link_scopes[link.name].cancel()
            await self.nursery.start(self._run_link, link)
        await self.refresh_folder_counts()
        self.log.info("reloaded", peers=len(self.links))
        # a signed checkpoint now (the peer witnesses it): what the log holds so far can
        # be exported with both ends signed without a restart (docs/EVIDENCE.md)
        await evidence.checkpoint_and_send(self, "reload")
        systemd.ready(f"serving {len(self.links)} peer(s)")


    async def _close_revoked(self, cfg: Config) -> None:
        """End at once every session whose peer certificate the (new) CRL revokes."""
        if cfg.tls.crl is None:
            return
        sessions = {name: link.active for name, link in self.links.items()
                    if link.active is not None}
        if not sessions:
            return
        ders = {name: der for name, runner in sessions.items()
                if (der := _peer_der(runner)) is not None}
        try:
            revoked = await in_thread(revoked_peers, cfg.tls.crl, cfg.tls.ca, ders)
        except (LinkdError, OSError) as exc:
            self.log.error("crl_unusable", reason=f"{exc}: connected sessions were not "
                                                  "checked against it")
            return
        closing: list[tuple[SessionRunner, str]] = []
        for name, serial in revoked.items():
            runner = sessions[name]
            if self.links.get(name) is None or self.links[name].active is not runner:
                continue
            reason = (f"certificate revoked: serial {serial:x} is listed in the reloaded CRL "
                      f"{cfg.tls.crl.name}")
            self.log.warning("session_revoked", peer=name, remote=runner.remote, reason=reason)
            closing.append((runner, reason))
        await close_side_by_side(closing, error=True)

    async def _rebind(self, cfg: Config) -> list[trio.SocketListener] | None:
        """New listeners when [listen] changed (None: unchanged). The old ones keep
        serving until the reload commits; a port that cannot be bound refuses the
        whole reload with one line (ConfigError), and the old [listen] stays."""
        if cfg.listen == self.cfg.listen:
            return None
        if cfg.listen is None:
            return []
        try:
            return await trio.open_tcp_listeners(cfg.listen.port, host=cfg.listen.address)
        except OSError as exc:
            where = f"{cfg.listen.address}:{cfg.listen.port}"
            fix = ("use an address of this host" if exc.errno == errno.EADDRNOTAVAIL
                   else "grant it or use a port above 1023" if exc.errno == errno.EACCES
                   else "free the port")
            raise ConfigError(f"[listen] changed but {where} cannot be bound "
                              f"({exc.strerror or exc}): kept listening as before; {fix} "
                              "or change [listen] and reload again") from None


def run(config_path: str, log_format: str | None, log_level: str | None = None) -> int:
    """Entry point of `linkd -c CONFIG`: returns the exit code."""
    import sys
    logmod.configure(log_format, log_level or "info")
    try:
        cfg = load_config(config_path)
        logmod.configure(log_format, log_level or cfg.node.log_level, node=cfg.node.name)
        problems = startup_problems(cfg)
        if problems:
            raise StartupError(problems[0])
        daemon = Daemon(cfg)
    except (LinkdError, OSError) as exc:
        print(f"linkd: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(daemon.serve)
    except BaseException as exc:  # noqa: BLE001 - unwrap exception groups to one line
        found = _find(exc, LinkdError)
        if found is not None:
            print(f"linkd: {found}", file=sys.stderr)
            return 1
        if _find(exc, KeyboardInterrupt) is not None:
            return 0
        raise
    return 0


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


CRL_EXPIRED = "(tls.crl): CRL expired"      # certs.load_crl's wording


def _peer_der(runner: SessionRunner) -> bytes | None:
    get = getattr(runner.stream, "peer_certificate_der", None)
    return get() if get is not None else None


def revoked_peers(crl_path: Path, ca_path: Path, ders: dict[str, bytes]) -> dict[str, int]:
    """Blocking: {peer: serial} for the certificates in `ders` that the CRL lists
    (verified against the CA; an expired CRL still counts: revocation is final)."""
    from cryptography import x509

    from .certs import load_crl
    crl = load_crl(crl_path, ca_path, now=dt.datetime(1970, 1, 1, tzinfo=dt.UTC))
    found: dict[str, int] = {}
    for name, der in ders.items():
        cert = x509.load_der_x509_certificate(der)
        if cert.issuer == crl.issuer and \
                crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            found[name] = cert.serial_number
    return found


FolderSeen = dict[str, tuple[int, int, int, int]]   # path -> (dev, ino, mtime_ns, count)
SETTLED_NS = 2_000_000_000   # an mtime this recent may hide a later change in the same tick


def _folder_counts(layout: SpoolLayout, channels: list[str],
                   seen: FolderSeen | None = None) -> tuple[dict[str, int], int]:
    """Blocking: (files in failed/<ch>/ per channel, files in quarantine/). With
    `seen`, a folder whose (dev, inode, mtime) is what it was when last counted,
    and not too recent to tell, keeps its count without being listed."""
    def count(folder: Path) -> int:
        if seen is None:
            return count_files(folder)
        key = str(folder)
        try:
            st = os.stat(folder)
        except OSError:
            seen.pop(key, None)
            return 0
        old = seen.get(key)
        if (old is not None and old[:3] == (st.st_dev, st.st_ino, st.st_mtime_ns)
                and time.time_ns() - st.st_mtime_ns > SETTLED_NS):
            return old[3]
        n = count_files(folder)
        seen[key] = (st.st_dev, st.st_ino, st.st_mtime_ns, n)
        return n
    return ({n: count(layout.failed_dir(n)) for n in channels},
            count(layout.quarantine_dir()))
