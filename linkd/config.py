"""Configuration: TOML (CONTRACT §2) loaded into frozen dataclasses.

Every error is a `ConfigError` whose message is one line naming the file, the
key (dotted, e.g. `peer[0].channel[1].name` or `link.heartbeat_intervall`)
and the fix. Unknown keys are errors. Relative paths are resolved against the
config file's folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import ConfigError

DEFAULT_CONFIG = "/etc/linkd/linkd.toml"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelConfig:
    name: str                     # [A-Za-z0-9_.-]{1,64}
    priority: int = 0             # higher goes first
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@dataclasses.dataclass(frozen=True, slots=True)
class PeerConfig:
    name: str
    connect: tuple[str, int] | None = None   # (host, port) parsed from "host:port" / "[v6]:port"
    pin_sha256: str | None = None            # normalised: lowercase hex, no colons, 64 chars
    channels: tuple[ChannelConfig, ...] = ()

    def channel(self, name: str) -> ChannelConfig | None:
        for c in self.channels:
            if c.name == name:
                return c
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    spool_dir: Path
    state_dir: Path                # default <spool_dir>/.linkd
    status_socket: Path            # default <state_dir>/status.sock
    file_mode: int = 0o640


@dataclasses.dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ListenConfig:
    address: str = "0.0.0.0"
    port: int = 7443


@dataclasses.dataclass(frozen=True, slots=True)
class LinkConfig:
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 15.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    handshake_timeout: float = 10.0
    archive_sent: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    path: Path                     # the config file, absolute
    node: NodeConfig
    tls: TLSConfig
    listen: ListenConfig | None
    link: LinkConfig
    peers: tuple[PeerConfig, ...]

    def peer(self, name: str) -> PeerConfig | None:
        for p in self.peers:
            if p.name == name:
                return p
        return None


def load_config(path: str | Path) -> Config:
    """Read and validate `path`; raise ConfigError (one line) on any problem."""
    raise NotImplementedError  # implemented by the config work item
