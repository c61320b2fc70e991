"""The exception tree.

One root, `LinkdError`. Errors a *person* can cause (config, certificates,
paths) carry a message that is already the one line to print. Protocol errors
are split, as h11 does, by who broke the rules: `RemoteProtocolError` (the peer
sent something wrong: close that session, log the reason) and
`LocalProtocolError` (our own code asked the core for something illegal: a bug).
"""


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
