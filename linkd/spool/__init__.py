"""Durable spool files: claim, send in order, deliver exactly once (docs/DELIVERY.md).

Synchronous on purpose: the daemon calls into it from worker threads
(`trio.to_thread.run_sync`, one call per batch). Never imports trio, proto or net.
"""

from .fs import FS
from .inbound import ChecksumMismatch, Completed, Delivered, Inbound, InboundRefused
from .layout import (
    LockHandle,
    SpoolLayout,
    lock_spool_dir,
    lock_state_dir,
    plain_name_problem,
    tilde_name,
)
from .outbound import Claimed, FailedFile, FileChanged, Outbound, Resolved, ResourceBusy

__all__ = [
    "FS", "ChecksumMismatch", "Claimed", "Completed", "Delivered", "FailedFile",
    "FileChanged", "Resolved", "ResourceBusy",
    "Inbound", "InboundRefused", "LockHandle", "Outbound", "SpoolLayout", "lock_spool_dir",
    "lock_state_dir", "plain_name_problem", "tilde_name",
]
