"""Configuration: TOML (CONTRACT §2) loaded into frozen dataclasses.

Every error is a `ConfigError` whose message is one line naming the file, the
key (dotted, e.g. `peer[0].channel[1].name` or `link.heartbeat_intervall`)
and the fix. Unknown keys are errors. Relative paths are resolved against the
config file's folder.

Size: over 400 lines on purpose: one loader per TOML table, each naming its
keys in its errors, keeps the schema of CONTRACT §2 in one place.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError
from .names import is_channel_name

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
    spool_group: str | None = None  # out/ 2770, in/ 2750 for this group (producers)
    log_level: str = "info"         # debug | info | warning | error
    audit_checkpoint_lines: int = 1000   # a signed audit checkpoint every N lines


@dataclasses.dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None
    require_post_quantum: bool = False      # refuse peers without a hybrid (ML-KEM) key exchange


@dataclasses.dataclass(frozen=True, slots=True)
class ListenConfig:
    address: str = "0.0.0.0"
    port: int = 7443


@dataclasses.dataclass(frozen=True, slots=True)
class StatusConfig:
    metrics_listen: tuple[str, int] | None = None   # TCP (host, port) serving GET /metrics


@dataclasses.dataclass(frozen=True, slots=True)
class LinkConfig:
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 15.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    handshake_timeout: float = 10.0
    archive_sent: bool = False
    # Per peer: beyond either, inbound is refused with a "busy" nack until the operator
    # clears quarantine/ (a lying or broken peer cannot fill the disk with bad files).
    quarantine_max_files: int = 1000
    quarantine_max_bytes: int = 1 << 30
    # While a channel has a message in flight, lower priorities wait, for at most this
    # share of the time (proto/scheduler.py PriorityHold); 0: they never wait.
    priority_hold: float = 0.25


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    path: Path                     # the config file, absolute
    node: NodeConfig
    tls: TLSConfig
    listen: ListenConfig | None
    link: LinkConfig
    peers: tuple[PeerConfig, ...]
    status: StatusConfig = StatusConfig()

    def peer(self, name: str) -> PeerConfig | None:
        for p in self.peers:
            if p.name == name:
                return p
        return None


# --------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------

# Names that become directory names: one plain path component, nothing hidden.
_NODE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,253}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_FILE_MODE_RE = re.compile(r"(?:0[oO])?([0-7]{1,4})")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

_SECTIONS = ("node", "tls", "listen", "link", "peer", "status")
_NODE_KEYS = ("name", "spool_dir", "state_dir", "status_socket", "file_mode", "spool_group",
              "log_level", "audit_checkpoint_lines")
_STATUS_KEYS = ("metrics_listen",)
LOG_LEVELS = ("debug", "info", "warning", "error")
_TLS_KEYS = ("cert", "key", "ca", "crl", "require_post_quantum")
_LISTEN_KEYS = ("address", "port")
_LINK_FLOATS = ("heartbeat_interval", "heartbeat_timeout", "reconnect_min", "reconnect_max",
                "handshake_timeout")
_LINK_INTS = ("quarantine_max_files", "quarantine_max_bytes")
_LINK_KEYS = (*_LINK_FLOATS, "archive_sent", *_LINK_INTS, "priority_hold")
_PEER_KEYS = ("name", "connect", "pin_sha256", "channel")
_CHANNEL_KEYS = ("name", "priority", "max_message_bytes")

_EXAMPLES = {
    "name": '"interpol"', "spool_dir": '"/var/spool/linkd"', "state_dir": '"/var/lib/linkd"',
    "status_socket": '"/run/linkd/status.sock"', "file_mode": '"0640"',
    "audit_checkpoint_lines": "1000",
    "cert": '"/etc/linkd/tls/interpol.crt"', "key": '"/etc/linkd/tls/interpol.key"',
    "ca": '"/etc/linkd/tls/link-ca.crt"', "crl": '"/etc/linkd/tls/link-ca.crl"',
    "address": '"0.0.0.0"', "port": "7443", "archive_sent": "false",
    "require_post_quantum": "false",
    "connect": '"europol-edge.example:7443"', "pin_sha256": '"<64 hex digits>"',
    "priority": "10", "max_message_bytes": "1073741824", "spool_group": '"linkd-producers"',
    "log_level": '"info"', "metrics_listen": '"127.0.0.1:9464"',
    "priority_hold": "0.25", "quarantine_max_files": "1000",
    "quarantine_max_bytes": "1073741824",
}


def _show(text: str) -> str:
    """`text` as is when it prints on one line, else JSON-quoted (escaped)."""
    return text if text.isprintable() else json.dumps(text)


def _quote(text: str) -> str:
    shown = json.dumps(text)
    return shown if len(shown) <= 60 else shown[:56] + '..."'


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({_quote(value)})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return "a date/time"
    return type(value).__name__


def _header(where: str) -> str:
    if ".channel[" in where:
        return "[[peer.channel]]"
    return "[[peer]]" if where.startswith("peer[") else f"[{where}]"


def _example(where: str, key: str) -> str:
    if key == "name" and where.startswith("peer["):
        return '"data"' if ".channel[" in where else '"europol"'
    if key in _LINK_FLOATS:
        return str(getattr(LinkConfig(), key))
    return _EXAMPLES.get(key, "...")


def _key_part(key: str) -> str:
    return key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key)


class _Loader:
    """Turns the parsed TOML document into a Config; stops at the first error."""

    def __init__(self, label: str, base: Path) -> None:
        self.label = label      # the config file as the user named it
        self.base = base        # its folder, absolute: relative paths start here

    def fail(self, key: str, problem: str, fix: str, ctx: str = "") -> NoReturn:
        where = f"{key} ({ctx})" if ctx else key
        raise ConfigError(f"{self.label}: {where}: {problem}: {fix}")

    # -- generic checks ------------------------------------------------------

    def keys(self, table: dict[str, Any], allowed: tuple[str, ...], where: str,
             ctx: str = "") -> None:
        for key, value in table.items():
            if key in allowed:
                continue
            what = "unknown table" if isinstance(value, dict) else "unknown key"
            dotted = f"{where}.{_key_part(key)}" if where else _key_part(key)
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            if close:
                fix = f"did you mean {close[0]}?"
                raise ConfigError(f"{self.label}: {dotted}{f' ({ctx})' if ctx else ''}: "
                                  f"{what} ({fix})")
            section = _header(where) if where else "the top level"
            self.fail(dotted, what, f"remove it (known in {section}: {', '.join(allowed)})", ctx)

    def table(self, value: object, key: str, header: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {_describe(value)}",
                      f"write it as a {header} section")
        return value

    def get(self, table: dict[str, Any], key: str, where: str, kind: type,
            required: bool = False, ctx: str = "") -> Any:
        dotted = f"{where}.{key}"
        if key not in table:
            if required:
                self.fail(dotted, "missing (required)",
                          f"add {key} = {_example(where, key)} to {_header(where)}",
                          ctx)
            return None
        value = table[key]
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            want = "a number"
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        elif kind is bool:
            ok = isinstance(value, bool)
            want = "true or false"
        else:
            ok = isinstance(value, str)
            want = "a string"
        if not ok:
            self.fail(dotted, f"expected {want}, got {_describe(value)}",
                      f"write e.g. {key} = {_example(where, key)}", ctx)
        if kind is float:
            return float(value)
        return value

    def path(self, table: dict[str, Any], key: str, where: str,
             required: bool = False) -> Path | None:
        text: str | None = self.get(table, key, where, str, required)
        if text is None:
            return None
        if not text or "\x00" in text:
            self.fail(f"{where}.{key}", f"{_quote(text)} is not a usable path",
                      f"write e.g. {key} = {_EXAMPLES[key]}")
        return self.base / text

    def name(self, text: str, key: str, what: str) -> None:
        if not _NODE_NAME_RE.fullmatch(text) or text.startswith("."):
            self.fail(key, f"{_quote(text)} is not a valid {what} name",
                      "use 1-253 of A-Z a-z 0-9 _ . - not starting with '.' "
                      "(it becomes a folder name and must be in the certificate)")

    # -- sections ------------------------------------------------------------

    def node(self, doc: dict[str, Any]) -> NodeConfig:
        if "node" not in doc:
            self.fail("node", "missing [node] section",
                      'add [node] with name = "..." and spool_dir = "..."')
        t = self.table(doc["node"], "node", "[node]")
        self.keys(t, _NODE_KEYS, "node")
        name = self.get(t, "name", "node", str, required=True)
        self.name(name, "node.name", "node")
        spool = self.path(t, "spool_dir", "node", required=True)
        assert spool is not None
        state = self.path(t, "state_dir", "node") or spool / ".linkd"
        sock = self.path(t, "status_socket", "node") or state / "status.sock"
        mode = 0o640
        text = self.get(t, "file_mode", "node", str)
        if text is not None:
            m = _FILE_MODE_RE.fullmatch(text)
            if m is None or int(m.group(1), 8) > 0o777:
                self.fail("node.file_mode", f"{_quote(text)} is not an octal file mode",
                          'write e.g. file_mode = "0640" (at most "0777")')
            mode = int(m.group(1), 8)
        group = self.get(t, "spool_group", "node", str)
        if group is not None and (not group or not group.isprintable() or "/" in group
                                  or ":" in group or " " in group):
            self.fail("node.spool_group", f"{_quote(group)} is not a group name",
                      'write e.g. spool_group = "linkd-producers" (a group in /etc/group)')
        level = self.get(t, "log_level", "node", str)
        if level is not None and level.lower() not in LOG_LEVELS:
            self.fail("node.log_level", f"{_quote(level)} is not a log level",
                      f"use one of {', '.join(LOG_LEVELS)}")
        every = self.get(t, "audit_checkpoint_lines", "node", int)
        if every is not None and not 1 <= every <= 1_000_000:
            self.fail("node.audit_checkpoint_lines", f"{every} is out of range",
                      "use 1 to 1000000 (lines between signed audit checkpoints)")
        return NodeConfig(name=name, spool_dir=spool, state_dir=state, status_socket=sock,
                          file_mode=mode, spool_group=group,
                          log_level="info" if level is None else level.lower(),
                          audit_checkpoint_lines=every or 1000)

    def status(self, doc: dict[str, Any]) -> StatusConfig:
        if "status" not in doc:
            return StatusConfig()
        t = self.table(doc["status"], "status", "[status]")
        self.keys(t, _STATUS_KEYS, "status")
        text = self.get(t, "metrics_listen", "status", str)
        if text is None:
            return StatusConfig()
        return StatusConfig(metrics_listen=self.connect(text, "status.metrics_listen", ""))

    def tls(self, doc: dict[str, Any]) -> TLSConfig:
        if "tls" not in doc:
            self.fail("tls", "missing [tls] section", "add [tls] with cert, key and ca")
        t = self.table(doc["tls"], "tls", "[tls]")
        self.keys(t, _TLS_KEYS, "tls")
        cert = self.path(t, "cert", "tls", required=True)
        key = self.path(t, "key", "tls", required=True)
        ca = self.path(t, "ca", "tls", required=True)
        assert cert is not None and key is not None and ca is not None
        require_pq = self.get(t, "require_post_quantum", "tls", bool)
        return TLSConfig(cert=cert, key=key, ca=ca, crl=self.path(t, "crl", "tls"),
                         require_post_quantum=bool(require_pq))

    def listen(self, doc: dict[str, Any]) -> ListenConfig | None:
        if "listen" not in doc:
            return None
        t = self.table(doc["listen"], "listen", "[listen]")
        self.keys(t, _LISTEN_KEYS, "listen")
        address = self.get(t, "address", "listen", str)
        if address is not None:
            if address.startswith("[") and address.endswith("]"):
                address = address[1:-1]
            if not address or not address.isprintable() or " " in address:
                self.fail("listen.address", f"{_quote(address)} is not an address",
                          'write e.g. address = "0.0.0.0" or "::"')
        port = self.get(t, "port", "listen", int)
        if port is not None and not 1 <= port <= 65535:
            self.fail("listen.port", f"{port} is not a TCP port", "use 1..65535, e.g. 7443")
        defaults = ListenConfig()
        return ListenConfig(address=defaults.address if address is None else address,
                            port=defaults.port if port is None else port)

    def link(self, doc: dict[str, Any]) -> LinkConfig:
        if "link" not in doc:
            return LinkConfig()
        t = self.table(doc["link"], "link", "[link]")
        self.keys(t, _LINK_KEYS, "link")
        values: dict[str, Any] = {}
        for key in _LINK_FLOATS:
            value = self.get(t, key, "link", float)
            if value is not None:
                if not (math.isfinite(value) and value > 0):
                    self.fail(f"link.{key}", f"{value} is not a positive number of seconds",
                              f"write e.g. {key} = {getattr(LinkConfig(), key)}")
                values[key] = value
        hold = self.get(t, "priority_hold", "link", float)
        if hold is not None:
            if not (math.isfinite(hold) and 0.0 <= hold <= 0.9):
                self.fail("link.priority_hold",
                          f"{hold} is out of range (a share of time from 0 to 0.9)",
                          "write e.g. priority_hold = 0.25 (0: lower priorities never wait)")
            values["priority_hold"] = hold
        archive = self.get(t, "archive_sent", "link", bool)
        if archive is not None:
            values["archive_sent"] = archive
        for key in _LINK_INTS:
            count = self.get(t, key, "link", int)
            if count is not None:
                if count < 1:
                    self.fail(f"link.{key}", f"{count} is not a positive integer",
                              f"write e.g. {key} = {getattr(LinkConfig(), key)}")
                values[key] = count
        link = LinkConfig(**values)
        if link.heartbeat_timeout <= link.heartbeat_interval:
            self.fail("link.heartbeat_timeout",
                      f"{link.heartbeat_timeout} is not greater than link.heartbeat_interval "
                      f"({link.heartbeat_interval})",
                      "make heartbeat_timeout larger than heartbeat_interval (e.g. 3 times)")
        if link.reconnect_max < link.reconnect_min:
            self.fail("link.reconnect_max",
                      f"{link.reconnect_max} is less than link.reconnect_min "
                      f"({link.reconnect_min})", "make reconnect_max >= reconnect_min")
        return link

    def connect(self, text: str, key: str, ctx: str) -> tuple[str, int]:
        host, port = "", ""
        if text.startswith("["):
            inner, sep, rest = text[1:].partition("]")
            if sep and rest.startswith(":"):
                try:
                    ipaddress.IPv6Address(inner)
                    host, port = inner, rest[1:]
                except ValueError:
                    pass
        else:
            head, sep, tail = text.rpartition(":")
            if sep and ":" not in head:
                host, port = head, tail
        if (not host or not host.isprintable() or any(c.isspace() for c in host)
                or not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535):
            self.fail(key, f'{_quote(text)} is not "host:port" or "[IPv6]:port" '
                           "with a port in 1..65535",
                      'write e.g. metrics_listen = "127.0.0.1:9464"' if key.startswith("status.")
                      else 'write e.g. connect = "europol-edge.example:7443" or '
                           '"[2001:db8::1]:7443"', ctx)
        return host, int(port)

    def channel(self, value: object, key: str, ctx: str) -> ChannelConfig:
        t = self.table(value, key, "[[peer.channel]]")
        self.keys(t, _CHANNEL_KEYS, key, ctx)
        name = self.get(t, "name", key, str, required=True, ctx=ctx)
        if not is_channel_name(name):
            self.fail(f"{key}.name", f"{_quote(name)} is not a valid channel name",
                      "use 1-64 of A-Z a-z 0-9 _ . - (not '.' or '..')", ctx)
        priority = self.get(t, "priority", key, int, ctx=ctx)
        limit = self.get(t, "max_message_bytes", key, int, ctx=ctx)
        if limit is not None and limit < 1:
            self.fail(f"{key}.max_message_bytes", f"{limit} is not a positive size",
                      "write a size in bytes, e.g. max_message_bytes = 1073741824", ctx)
        return ChannelConfig(name=name, priority=0 if priority is None else priority,
                             max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES if limit is None
                             else limit)

    def peer(self, value: object, index: int, node_name: str) -> PeerConfig:
        where = f"peer[{index}]"
        t = self.table(value, where, "[[peer]]")
        raw = t.get("name")
        ctx = raw if isinstance(raw, str) and _NODE_NAME_RE.fullmatch(raw) else ""
        self.keys(t, _PEER_KEYS, where, ctx)
        name = self.get(t, "name", where, str, required=True)
        self.name(name, f"{where}.name", "peer")
        if name.lower() == node_name.lower():
            self.fail(f"{where}.name", f"peer {name} has this node's own name (node.name)",
                      "name each peer after the other site, not this one")
        connect = None
        text = self.get(t, "connect", where, str, ctx=ctx)
        if text is not None:
            connect = self.connect(text, f"{where}.connect", ctx)
        pin = self.get(t, "pin_sha256", where, str, ctx=ctx)
        if pin is not None:
            pin = pin.replace(":", "").lower()
            if not _SHA256_RE.fullmatch(pin):
                self.fail(f"{where}.pin_sha256", "not a SHA-256 in hex (64 hex digits, "
                          "colons allowed)",
                          "paste the fingerprint that openssl x509 -noout -fingerprint "
                          "-sha256 -in PEER.crt prints", ctx)
        chans = t.get("channel")
        if chans is None or chans == []:
            self.fail(where, "has no [[peer.channel]]",
                      'add one, e.g. [[peer.channel]] with name = "data"', ctx)
        if not isinstance(chans, list):
            self.fail(f"{where}.channel", f"expected an array of tables, got {_describe(chans)}",
                      "write each channel as a [[peer.channel]] section", ctx)
        channels: list[ChannelConfig] = []
        for j, item in enumerate(chans):
            key = f"{where}.channel[{j}]"
            channel = self.channel(item, key, ctx)
            for k, other in enumerate(channels):
                if other.name == channel.name:
                    self.fail(f"{key}.name", f"duplicate channel {channel.name} "
                              f"(also {where}.channel[{k}])",
                              "give each channel of a peer a unique name", ctx)
            channels.append(channel)
        return PeerConfig(name=name, connect=connect, pin_sha256=pin, channels=tuple(channels))

    def config(self, path: Path, doc: dict[str, Any]) -> Config:
        self.keys(doc, _SECTIONS, "")
        node = self.node(doc)
        tls = self.tls(doc)
        listen = self.listen(doc)
        link = self.link(doc)
        raw = doc.get("peer", [])
        if not isinstance(raw, list):
            self.fail("peer", f"expected an array of tables, got {_describe(raw)}",
                      "write each peer as a [[peer]] section (double brackets)")
        peers: list[PeerConfig] = []
        for i, item in enumerate(raw):
            peer = self.peer(item, i, node.name)
            for k, other in enumerate(peers):
                if other.name.lower() == peer.name.lower():
                    self.fail(f"peer[{i}].name", f"duplicate peer {peer.name} (also peer[{k}]; "
                              "names are compared ignoring case, as in certificates)",
                              "configure each peer once", peer.name)
            peers.append(peer)
        return Config(path=path, node=node, tls=tls, listen=listen, link=link,
                      peers=tuple(peers), status=self.status(doc))


def load_config(path: str | Path) -> Config:
    """Read and validate `path`; raise ConfigError (one line) on any problem."""
    label = _show(str(path))
    given = Path(path)
    try:
        raw = given.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{label}: config file not found: pass an existing file with "
                          "-c/--config or set LINKD_CONFIG") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a folder, not a config file: "
                          "pass the TOML file itself with -c/--config") from None
    except PermissionError:
        raise ConfigError(f"{label}: permission denied reading the config file as uid "
                          f"{os.getuid()}: make it readable to the user linkd runs as, and "
                          "run linkctl as that user or root") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"{label}: cannot read the config file ({_one_line(str(reason))}): "
                          "check the path given with -c/--config") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML: not UTF-8 text (bad byte at offset "
                          f"{exc.start}): save the file as UTF-8") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML: {_one_line(str(exc))}: "
                          "fix the syntax there") from None
    absolute = given.absolute()
    return _Loader(label, absolute.parent).config(absolute, doc)


# --------------------------------------------------------------------------
# The effective configuration as TOML (`linkd --print-config`)
# --------------------------------------------------------------------------

def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _plain(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A dataclass as a TOML table: paths as strings, None left out (TOML has no null).
    Generic over the fields, so a key added to a section is printed without more code."""
    table: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if field.name in skip or value is None:
            continue
        table[field.name] = str(value) if isinstance(value, Path) else value
    return table


def effective_document(cfg: Config) -> dict[str, Any]:
    """The TOML document that, loaded again, gives `cfg` (defaults filled in)."""
    node = _plain(cfg.node)
    node["file_mode"] = f"0{cfg.node.file_mode:03o}"
    doc: dict[str, Any] = {"node": node, "tls": _plain(cfg.tls)}
    if cfg.listen is not None:
        doc["listen"] = _plain(cfg.listen)
    doc["link"] = _plain(cfg.link)
    if cfg.status.metrics_listen is not None:
        doc["status"] = {"metrics_listen": _address(*cfg.status.metrics_listen)}
    peers = []
    for peer in cfg.peers:
        table = _plain(peer, skip=("connect", "channels"))
        if peer.connect is not None:
            table["connect"] = _address(*peer.connect)
        table["channel"] = [_plain(c) for c in peer.channels]
        peers.append(table)
    if peers:
        doc["peer"] = peers
    return doc


def print_config(path: str | Path) -> str:
    """`linkd --print-config`: the effective configuration as TOML text."""
    import tomli_w  # the TOML writer of tomllib's author; tomllib itself only reads

    cfg = load_config(path)
    return f"# effective configuration of {_show(str(cfg.path))}\n" + \
        tomli_w.dumps(effective_document(cfg))
