"""The daemon's side of the audit log: open it, keep it synced, share checkpoints.

Trio glue around audit.AuditLog (which is pure): `open_audit` before the first
log line, `audit_loop` (fsync at most a second behind; every new checkpoint sent
to each connected peer to witness), `checkpoint_and_send` at the start of a
clean shutdown (so the peer witnesses our state before the goodbye),
`renew_signer` when a reload installs a new certificate, `close_audit` (a last
checkpoint, fsync) after the last line.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from . import audit as A
from . import keys

SYNC_INTERVAL = 0.5
RESUME_INTERVAL = 5.0       # while the disk is full: how often to try writing again


def open_audit(cfg: Any) -> A.AuditLog:
    """Blocking: open `<state_dir>/audit/audit.jsonl` and install it as the sink."""
    signer = keys.Signer.from_files(cfg.tls.cert, cfg.tls.key)
    keys.CertStore(cfg.node.state_dir / "certs").keep(signer.cert_der)
    every = getattr(cfg.node, "audit_checkpoint_lines", A.DEFAULT_CHECKPOINT_LINES)
    log = A.AuditLog(cfg.node.state_dir / "audit", cfg.node.name, signer, every)
    log.open()
    A.install(log)
    return log


async def renew_signer(daemon: Any, signer: keys.Signer) -> bool:
    """After a reload: sign checkpoints with `signer` (the reloaded [tls] cert and
    key) if it is another certificate than the log's; True if so. The last checkpoint
    signed by the old key goes to the sessions still running under the old
    certificate (their peer checks it with that one), before the caller ends them;
    the new certificate is kept in certs/ as the first one was."""
    log = A.current()
    if log is None or (log.signer is not None and log.signer.cert_sha256 == signer.cert_sha256):
        return False
    last_old = await trio.to_thread.run_sync(log.renew, signer)
    try:
        certs = keys.CertStore(daemon.cfg.node.state_dir / "certs")
        await trio.to_thread.run_sync(certs.keep, signer.cert_der)
    except OSError as exc:      # (the log's audit_key line carries it all the same)
        daemon.log.error("audit_log_failed", reason=f"cannot keep the renewed certificate "
                                                    f"in {certs.folder}: {exc}")
    _send(daemon, last_old)
    return True


def _send(daemon: Any, line: bytes | None) -> None:
    if line is None:
        return
    for link in list(daemon.links.values()):
        runner = getattr(link, "active", None)
        if runner is not None and hasattr(runner, "send_checkpoint"):
            runner.send_checkpoint(line)


async def audit_loop(daemon: Any) -> None:
    log = A.current()
    if log is None:
        return
    seen = log.checkpoints
    while True:
        await trio.sleep(SYNC_INTERVAL)
        try:
            await trio.to_thread.run_sync(log.sync)
        except OSError as exc:
            daemon.log.error("audit_log_failed", reason=str(exc))
            if not await _resume(daemon, log):
                return              # not a full disk: deliveries wait for a restart
        if log.checkpoints != seen:
            seen = log.checkpoints
            _send(daemon, log.latest_checkpoint)


def refusal_wait(default: float) -> float:
    """How long a sender refused because the audit log cannot be written waits: until
    the log tries again after a full disk (it heals by itself), else `default`."""
    log = A.current()
    return RESUME_INTERVAL if log is not None and log.resumable() else default


async def _resume(daemon: Any, log: A.AuditLog) -> bool:
    """After a full disk: try every RESUME_INTERVAL until the log can be written again
    (then log audit_log_resumed and reconcile the deliveries journaled meanwhile, as
    at start-up: none was acknowledged, but a commit cut short may have completed).
    False at once for a failure that only a restart may clear."""
    while log.resumable():
        await trio.sleep(RESUME_INTERVAL)
        resumed = time.time()
        if not await trio.to_thread.run_sync(log.resume):
            continue
        daemon.log.warning("audit_log_resumed", failed_at=log.failed_at_last,
                           reason="the audit log can be written again: deliveries go on")
        try:
            tail = await trio.to_thread.run_sync(log.tail)
            for link in list(daemon.links.values()):
                link.reconcile_audit(tail, await trio.to_thread.run_sync(link.journaled),
                                     until=resumed)
        except OSError as exc:      # (EMFILE, EIO...): the next start-up reconciles
            daemon.log.error("audit_reconcile_failed", reason=str(exc))
        return True
    return False


async def checkpoint_and_send(daemon: Any, why: str) -> None:
    log = A.current()
    if log is None:
        return
    try:
        line = await trio.to_thread.run_sync(log.checkpoint, why)
    except OSError as exc:
        daemon.log.error("audit_log_failed", reason=str(exc))
        return
    _send(daemon, line)


def close_audit() -> None:
    log = A.current()
    if log is not None:
        log.close()
        A.install(None)
