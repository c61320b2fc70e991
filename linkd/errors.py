"""The exception tree.

One root, `LinkdError`. Errors a *person* can cause (config, certificates,
paths) carry a message that is already the one line to print. Protocol errors
are split, as h11 does, by who broke the rules: `RemoteProtocolError` (the peer
sent something wrong: close that session, log the reason) and
`LocalProtocolError` (our own code asked the core for something illegal: a bug).
"""

from __future__ import annotations

from pathlib import Path


class LinkdError(Exception):
    """Root of every error linkd raises on purpose."""


class ConfigError(LinkdError):
    """The configuration (or a file it names) is unusable. str() is one line."""


class PKIError(LinkdError):
    """A PKI helper operation failed. str() is one line."""


class SpoolError(LinkdError):
    """A spool or state directory operation failed in a way that needs a person."""


class ProtocolError(LinkdError):
    """Somebody broke the wire protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: the session must be closed with this reason."""


class LocalProtocolError(ProtocolError):
    """We asked the protocol core for something illegal (a bug in linkd)."""


class IdentityError(LinkdError):
    """The peer's certificate is valid but not acceptable for this link."""


class TLSRefused(LinkdError):
    """The TLS handshake did not give a peer we accept; str() is the reason to log."""


class TLSError(LinkdError):
    """A TLS failure, as one readable line (the cause of a BrokenResourceError)."""


class InboundRefused(SpoolError):
    """The peer asked for something this spool will not do; `reason` says what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChecksumMismatch(SpoolError):
    """The received bytes do not match the announced SHA-256; kept in quarantine/."""

    def __init__(self, message: str, quarantined: Path) -> None:
        super().__init__(message)
        self.quarantined = quarantined


class ResourceBusy(SpoolError):
    """Out of descriptors, memory or similar: try again later; nothing is wrong
    with the file."""


class FileChanged(SpoolError):
    """A queued file is no longer what was claimed (changed after pick-up)."""


class SymlinkedFolder(SpoolError):
    """A spool or state folder is a symbolic link: refused."""

    def __init__(self, folder: Path, what: str) -> None:
        super().__init__(
            f"{folder} is {what}: linkd never writes through links in the spool or "
            f"state dir; replace it with a real folder (rm {folder}; linkd creates it)")
        self.folder = folder


class StartupError(LinkdError):
    """The daemon cannot start; str() is the one line to print."""


class StatusSocketError(LinkdError):
    """The status socket cannot be set up. str() is the one line to print."""


class ReceiptError(LinkdError, ValueError):
    """A receipt that is malformed or does not verify; str() is one line."""


class EncodingError(LinkdError, ValueError):
    """A value that has no canonical encoding (a float, a huge integer...)."""


class KeyError_(LinkdError, ValueError):
    """A key or certificate that cannot be used for evidence."""
