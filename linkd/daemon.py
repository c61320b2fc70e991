"""The composition root: config -> lock -> listeners -> recovery -> tasks -> READY=1.

Start-up is ordered so that everything that can refuse to start (config,
certificates, the state-dir lock, the listen port, the status socket) runs
before the first log line: a daemon that refuses to start prints exactly one
line (CONTRACT §10). Signals: SIGTERM/SIGINT stop pick-up, say goodbye on
every session and exit 0; SIGHUP re-reads config and certificates (new
sessions use them; peers and channels may come and go; a peer whose settings
changed gets a fresh session so both sides renegotiate channels).
"""

from __future__ import annotations

import datetime as dt
import errno
import signal
from typing import Any

import trio

from . import __version__, systemd
from . import log as logmod
from .check import startup_problems
from .config import Config, PeerConfig, load_config
from .errors import ConfigError, LinkdError
from .evidence import service as evidence
from .net.supervisor import dial_loop, handle_inbound
from .net.tls import TLSContexts, make_contexts
from .peer import PeerLink, in_thread
from .spool import lock_state_dir
from .status import StatusBoard, serve_status

STOP_GRACE = 5.0


class StartupError(LinkdError):
    """The daemon cannot start; str() is the one line to print."""


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

    # -- peers ------------------------------------------------------------------

    def _make_link(self, peer: PeerConfig) -> PeerLink:
        status = self.board.add_peer(peer.name, [c.name for c in peer.channels],
                                     "connecting" if peer.connect else "waiting")
        link = PeerLink(self.cfg, peer, status)
        self.links[peer.name] = link
        return link

    async def _run_link(self, link: PeerLink, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self.link_scopes[link.name] = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(link.pickup)
                if link.peer.connect is not None:
                    nursery.start_soon(dial_loop, self, link)
                task_status.started()

    # -- lifecycle --------------------------------------------------------------

    async def serve(self) -> None:
        cfg = self.cfg
        lock = lock_state_dir(cfg.node.state_dir)
        try:
            try:
                await in_thread(evidence.open_audit, cfg)   # the audit log (docs/EVIDENCE.md)
            except (OSError, ValueError) as exc:
                raise StartupError(f"cannot open the audit log in {cfg.node.state_dir}/audit: "
                                   f"{exc} (check state_dir and the key)") from None
            await self._serve()
        finally:
            evidence.close_audit()
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
        for peer in cfg.peers:
            self._make_link(peer)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                # Folders and recovery first: once /healthz answers, the spool is there.
                for link in self.links.values():
                    problems = await in_thread(link.prepare)
                    for problem in problems:
                        self.log.warning("recovery", peer=link.name, problem=problem)
                    link.log_recovered()
                await nursery.start(serve_status, self.board, cfg.node.status_socket)
                for listener in listeners:
                    nursery.start_soon(self._accept, listener)
                for link in self.links.values():
                    await nursery.start(self._run_link, link)
                self.log.info("started", version=__version__, peers=len(self.links),
                              listen=(f"{cfg.listen.address}:{cfg.listen.port}"
                                      if cfg.listen else None))
                systemd.ready(f"serving {len(self.links)} peer(s)")
                nursery.start_soon(systemd.watchdog_loop, lambda: True)
                nursery.start_soon(self._status_loop)
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

    async def _accept(self, listener: trio.SocketListener) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self.log.error("accept_failed", reason=str(exc))
                        await trio.sleep(0.5)
                        continue
                    raise
                nursery.start_soon(handle_inbound, self, stream)

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
        await evidence.checkpoint_and_send(self, "stopping")   # witnessed before the bye
        for scope in self.link_scopes.values():
            scope.cancel()   # stops pick-up and dialling
        with trio.move_on_after(STOP_GRACE):
            async with trio.open_nursery() as nursery:
                for link in self.links.values():
                    if link.active is not None:
                        nursery.start_soon(link.active.close, "peer is shutting down")
            for link in self.links.values():
                with trio.move_on_after(STOP_GRACE):
                    await link.wait_idle()

    async def reload(self) -> None:
        systemd.reloading()
        try:
            cfg = await in_thread(load_config, self.cfg.path)
            problems = await in_thread(startup_problems, cfg)
            if problems:
                raise ConfigError(problems[0])
            if cfg.node != self.cfg.node:
                raise ConfigError("[node] settings cannot change on reload: restart linkd")
            tls = make_contexts(cfg)
        except (LinkdError, OSError) as exc:
            self.log.error("reload_failed", reason=str(exc))
            systemd.ready("reload failed; running with the previous configuration")
            return
        old = self.cfg
        self.cfg, self.tls = cfg, tls
        assert self.nursery is not None
        new_names = {p.name for p in cfg.peers}
        for name in list(self.links):
            if name not in new_names:
                link = self.links.pop(name)
                link.removed = True
                if link.active is not None:
                    await link.active.close("peer removed from the configuration")
                self.link_scopes.pop(name).cancel()
                self.board.remove_peer(name)
        for peer in cfg.peers:
            existing = self.links.get(peer.name)
            if existing is None:
                link = self._make_link(peer)
                await in_thread(link.prepare)
                await self.nursery.start(self._run_link, link)
                continue
            link = existing
            before = old.peer(peer.name)
            link.cfg = cfg
            if before != peer:
                await link.reconfigure(cfg, peer)
                self.board.sync_channels(peer.name, [c.name for c in peer.channels])
                if link.active is not None:
                    await link.active.close("configuration reloaded")
                if (before is None or before.connect != peer.connect) and peer.connect:
                    self.link_scopes[peer.name].cancel()
                    await self.nursery.start(self._run_link, link)
        self.log.info("reloaded", peers=len(self.links))
        systemd.ready(f"serving {len(self.links)} peer(s)")


def run(config_path: str, log_format: str | None) -> int:
    """Entry point of `linkd -c CONFIG`: returns the exit code."""
    import sys
    logmod.configure(log_format)
    try:
        cfg = load_config(config_path)
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


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
