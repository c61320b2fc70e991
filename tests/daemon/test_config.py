"""load_config: every error is one line naming the file and the dotted key; good configs load."""

from __future__ import annotations

import copy
import json
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fsmodes import modes_are_enforced

from linkd.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ChannelConfig,
    LinkConfig,
    ListenConfig,
    load_config,
)
from linkd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "config"

BASE: dict[str, Any] = {
    "node": {"name": "alpha", "spool_dir": "/srv/spool"},
    "tls": {"cert": "/etc/linkd/alpha.crt", "key": "/etc/linkd/alpha.key",
            "ca": "/etc/linkd/ca.crt"},
    "peer": [{"name": "bravo", "connect": "bravo.example:7443",
              "channel": [{"name": "alerts", "priority": 10}, {"name": "data"}]}],
}


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """Tables as [sections], arrays of tables as [[sections]], the rest inline."""
    lines: list[str] = []
    nested: list[str] = []
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value is not doc:
            nested.append(f"\n[{name}]\n" + to_toml(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                nested.append(f"\n[[{name}]]\n" + to_toml(item, f"{name}."))
        else:
            lines.append(f"{json.dumps(key)} = {_value(value)}")
    return "\n".join(lines) + "\n" + "".join(nested)


def write(tmp_path: Path, doc: dict[str, Any] | str, name: str = "linkd.toml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else to_toml(doc))
    return path


def load(tmp_path: Path, change: Callable[[dict[str, Any]], None] | None = None):  # type: ignore[no-untyped-def]
    doc = copy.deepcopy(BASE)
    if change:
        change(doc)
    return load_config(write(tmp_path, doc))


def error(tmp_path: Path, change: Callable[[dict[str, Any]], None] | dict[str, Any] | str) -> str:
    """The ConfigError message for BASE after `change` (or for a whole document / text)."""
    if callable(change):
        doc = copy.deepcopy(BASE)
        change(doc)
        path = write(tmp_path, doc)
    else:
        path = write(tmp_path, change)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.isprintable(), repr(message)
    assert message.startswith(f"{path}: "), message
    return message


def test_base_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.path == tmp_path / "linkd.toml" and cfg.path.is_absolute()
    assert cfg.node.name == "alpha"
    assert cfg.node.spool_dir == Path("/srv/spool")
    assert cfg.node.state_dir == Path("/srv/spool/.linkd")
    assert cfg.node.status_socket == Path("/srv/spool/.linkd/status.sock")
    assert cfg.node.file_mode == 0o640
    assert cfg.tls.crl is None
    assert cfg.tls.require_post_quantum is False
    assert cfg.listen is None
    assert cfg.link == LinkConfig()
    (peer,) = cfg.peers
    assert peer.name == "bravo" and peer.connect == ("bravo.example", 7443)
    assert peer.pin_sha256 is None
    assert peer.channels == (ChannelConfig("alerts", 10, DEFAULT_MAX_MESSAGE_BYTES),
                             ChannelConfig("data", 0, DEFAULT_MAX_MESSAGE_BYTES))
    assert cfg.peer("bravo") is peer and peer.channel("data") is peer.channels[1]


def test_status_socket_defaults_under_a_configured_state_dir(tmp_path: Path) -> None:
    cfg = load(tmp_path, lambda d: d["node"].update(state_dir="/var/lib/linkd"))
    assert cfg.node.state_dir == Path("/var/lib/linkd")
    assert cfg.node.status_socket == Path("/var/lib/linkd/status.sock")


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    site = tmp_path / "site"
    site.mkdir()
    doc = copy.deepcopy(BASE)
    doc["node"] = {"name": "alpha", "spool_dir": "spool", "state_dir": "state",
                   "status_socket": "run/linkd.sock"}
    doc["tls"] = {"cert": "tls/a.crt", "key": "tls/a.key", "ca": "../ca.crt", "crl": "x.crl"}
    path = write(site, doc)
    monkeypatch.chdir("/")
    cfg = load_config(os.path.relpath(path, "/"))
    assert cfg.path == path
    assert cfg.node.spool_dir == site / "spool"
    assert cfg.node.state_dir == site / "state"
    assert cfg.node.status_socket == site / "run/linkd.sock"
    assert (cfg.tls.cert, cfg.tls.key, cfg.tls.crl) == (site / "tls/a.crt", site / "tls/a.key",
                                                        site / "x.crl")
    assert cfg.tls.ca == site / "../ca.crt"


def test_full_config_loads(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["node"]["file_mode"] = "0600"
        d["tls"]["crl"] = "/etc/linkd/ca.crl"
        d["tls"]["require_post_quantum"] = True
        d["listen"] = {"address": "127.0.0.1", "port": 1}
        d["link"] = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2, "reconnect_min": 0.2,
                     "reconnect_max": 0.2, "handshake_timeout": 3.5, "archive_sent": True}
        d["peer"][0]["pin_sha256"] = "AB:" * 31 + "CD"
        d["peer"][0]["channel"][1].update(priority=-5, max_message_bytes=1)
        d["peer"].append({"name": "charlie", "channel": [{"name": "data"}]})
    cfg = load(tmp_path, change)
    assert cfg.node.file_mode == 0o600
    assert cfg.tls.crl == Path("/etc/linkd/ca.crl")
    assert cfg.tls.require_post_quantum is True
    assert cfg.listen == ListenConfig("127.0.0.1", 1)
    assert cfg.link == LinkConfig(0.5, 2.0, 0.2, 0.2, 3.5, True)
    assert isinstance(cfg.link.heartbeat_timeout, float)
    assert cfg.peers[0].pin_sha256 == "ab" * 31 + "cd"
    assert cfg.peers[0].channels[1] == ChannelConfig("data", -5, 1)
    assert cfg.peers[1].connect is None and cfg.peer("charlie") is cfg.peers[1]


def test_empty_listen_section_means_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, lambda d: d.update(listen={})).listen == ListenConfig("0.0.0.0", 7443)


def test_a_node_without_peers_loads(tmp_path: Path) -> None:
    assert load(tmp_path, lambda d: d.pop("peer")).peers == ()


@pytest.mark.parametrize("text,mode", [("0640", 0o640), ("640", 0o640), ("0o640", 0o640),
                                       ("0O640", 0o640), ("0600", 0o600), ("0", 0),
                                       ("0777", 0o777), ("0o0644", 0o644)])
def test_file_mode_forms(tmp_path: Path, text: str, mode: int) -> None:
    assert load(tmp_path, lambda d: d["node"].update(file_mode=text)).node.file_mode == mode


@pytest.mark.parametrize("text,expected", [
    ("host.example:1", ("host.example", 1)),
    ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ("[::1]:7443", ("::1", 7443)),
    ("[2001:db8::17]:443", ("2001:db8::17", 443)),
])
def test_connect_forms(tmp_path: Path, text: str, expected: tuple[str, int]) -> None:
    cfg = load(tmp_path, lambda d: d["peer"][0].update(connect=text))
    assert cfg.peers[0].connect == expected


@pytest.mark.parametrize("pin", ["AB" * 32, "ab" * 32, ":".join(["Ab"] * 32)])
def test_pin_is_normalised(tmp_path: Path, pin: str) -> None:
    assert load(tmp_path, lambda d: d["peer"][0].update(pin_sha256=pin)).peers[0].pin_sha256 \
        == "ab" * 32


def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target = doc
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return change


def _drop(*path: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target = doc
        for part in path[:-1]:
            target = target[part]
        del target[path[-1]]
    return change


ERRORS: list[tuple[str, Callable[[dict[str, Any]], None], tuple[str, ...]]] = [
    # unknown keys, at every level, with a suggestion when one is close
    ("link typo", _set("link", value={"heartbeat_intervall": 5.0}),
     ("link.heartbeat_intervall: unknown key (did you mean heartbeat_interval?)",)),
    ("node typo", _set("node", "spool_dri", value="/x"), ("node.spool_dri", "spool_dir?")),
    ("tls unknown", _set("tls", "crl_file", value="/x"), ("tls.crl_file", "unknown key",
                                                         "remove it")),
    ("listen typo", _set("listen", value={"prot": 1}), ("listen.prot", "port?")),
    ("peer typo", _set("peer", 0, "pin_sha265", value="00"),
     ("peer[0].pin_sha265", "bravo", "pin_sha256?")),
    ("channel typo", _set("peer", 0, "channel", 1, "priorty", value=1),
     ("peer[0].channel[1].priorty", "priority?")),
    ("channels", _set("peer", 0, "channels", value=[{"name": "x"}]),
     ("peer[0].channels", "channel?")),
    ("top-level table", _set("nodes", value={"name": "x"}), ("nodes", "unknown table",
                                                            "node?")),
    ("top-level key", _set("debug", value=True), ("debug", "unknown key")),
    # wrong types
    ("node not table", _set("node", value="alpha"), ("node", "table")),
    ("name int", _set("node", "name", value=5), ("node.name", "string", "integer")),
    ("port str", _set("listen", value={"port": "7443"}), ("listen.port", "integer")),
    ("port bool", _set("listen", value={"port": True}), ("listen.port", "integer",
                                                         "boolean")),
    ("interval str", _set("link", value={"heartbeat_interval": "5"}),
     ("link.heartbeat_interval", "number")),
    ("interval bool", _set("link", value={"reconnect_min": True}), ("link.reconnect_min",)),
    ("archive int", _set("link", value={"archive_sent": 1}), ("link.archive_sent", "true or")),
    ("hold str", _set("link", value={"priority_hold": "high"}),
     ("link.priority_hold", "number", "priority_hold = 0.25")),
    ("quarantine str", _set("link", value={"quarantine_max_files": "many"}),
     ("link.quarantine_max_files", "integer", "quarantine_max_files = 1000")),
    ("require_post_quantum str", _set("tls", "require_post_quantum", value="yes"),
     ("tls.require_post_quantum", "true or false")),
    ("priority float", _set("peer", 0, "channel", 0, "priority", value=1.5),
     ("peer[0].channel[0].priority", "integer")),
    ("max bool", _set("peer", 0, "channel", 0, "max_message_bytes", value=True),
     ("peer[0].channel[0].max_message_bytes",)),
    ("file_mode int", _set("node", "file_mode", value=0o640), ("node.file_mode", "string")),
    ("peer single table", _set("peer", value={"name": "bravo"}), ("peer", "[[peer]]")),
    ("channel single table", _set("peer", 0, "channel", value={"name": "x"}),
     ("peer[0].channel", "[[peer.channel]]")),
    ("path list", _set("tls", "ca", value=["a"]), ("tls.ca", "string")),
    ("empty path", _set("tls", "cert", value=""), ("tls.cert", "path")),
    # missing required keys
    ("no node", _drop("node"), ("node", "missing")),
    ("no tls", _drop("tls"), ("tls", "missing")),
    ("no node.name", _drop("node", "name"), ("node.name", "missing", "add name")),
    ("no spool_dir", _drop("node", "spool_dir"), ("node.spool_dir", "missing")),
    ("no cert", _drop("tls", "cert"), ("tls.cert", "missing")),
    ("no key", _drop("tls", "key"), ("tls.key", "missing")),
    ("no ca", _drop("tls", "ca"), ("tls.ca", "missing")),
    ("no peer name", _drop("peer", 0, "name"), ("peer[0].name", "missing", "[[peer]]")),
    ("no channel name", _drop("peer", 0, "channel", 0, "name"),
     ("peer[0].channel[0].name", "missing", "[[peer.channel]]")),
    ("no channels", _drop("peer", 0, "channel"),
     ("peer[0] (bravo)", "has no [[peer.channel]]", "add one")),
    ("empty channels", _set("peer", 0, "channel", value=[]), ("has no [[peer.channel]]",)),
    # duplicates and names
    ("duplicate peer", lambda d: d["peer"].append(copy.deepcopy(d["peer"][0])),
     ("peer[1].name", "duplicate", "peer[0]")),
    ("duplicate peer case", lambda d: d["peer"].append({"name": "BRAVO",
                                                        "channel": [{"name": "x"}]}),
     ("peer[1].name", "duplicate")),
    ("duplicate channel", _set("peer", 0, "channel", 1, "name", value="alerts"),
     ("peer[0].channel[1].name", "duplicate", "peer[0].channel[0]")),
    ("peer is node", _set("peer", 0, "name", value="Alpha"), ("peer[0].name", "own name")),
    ("peer slash", _set("peer", 0, "name", value="../etc"), ("peer[0].name", "not a valid")),
    ("peer dot", _set("peer", 0, "name", value=".linkd"), ("peer[0].name",)),
    ("peer dotdot", _set("peer", 0, "name", value=".."), ("peer[0].name",)),
    ("peer empty", _set("peer", 0, "name", value=""), ("peer[0].name",)),
    ("node slash", _set("node", "name", value="a/b"), ("node.name", "not a valid")),
    # values out of range
    ("port 0", _set("listen", value={"port": 0}), ("listen.port", "1..65535")),
    ("port big", _set("listen", value={"port": 65536}), ("listen.port",)),
    ("bad address", _set("listen", value={"address": ""}), ("listen.address",)),
    ("zero interval", _set("link", value={"heartbeat_interval": 0}),
     ("link.heartbeat_interval", "positive")),
    ("negative reconnect", _set("link", value={"reconnect_min": -1.0}),
     ("link.reconnect_min", "positive")),
    ("inf timeout", _set("link", value={"handshake_timeout": float("inf")}),
     ("link.handshake_timeout",)),
    ("nan", _set("link", value={"reconnect_max": float("nan")}), ("link.reconnect_max",)),
    ("hold all the time", _set("link", value={"priority_hold": 1.0}),
     ("link.priority_hold", "share of time from 0 to 0.9")),
    ("negative hold", _set("link", value={"priority_hold": -0.1}), ("link.priority_hold",)),
    ("timeout <= interval", _set("link", value={"heartbeat_interval": 20.0}),
     ("link.heartbeat_timeout", "heartbeat_interval")),
    ("timeout == interval", _set("link", value={"heartbeat_interval": 2,
                                                "heartbeat_timeout": 2}),
     ("link.heartbeat_timeout",)),
    ("max < min", _set("link", value={"reconnect_min": 5, "reconnect_max": 1}),
     ("link.reconnect_max", "reconnect_min")),
    ("max bytes 0", _set("peer", 0, "channel", 0, "max_message_bytes", value=0),
     ("peer[0].channel[0].max_message_bytes",)),
    ("file_mode word", _set("node", "file_mode", value="rw-r-----"), ("node.file_mode",
                                                                      "octal")),
    ("file_mode 8", _set("node", "file_mode", value="0o8"), ("node.file_mode",)),
    ("file_mode sticky", _set("node", "file_mode", value="1777"), ("node.file_mode",)),
    ("file_mode empty", _set("node", "file_mode", value=""), ("node.file_mode",)),
    ("pin short", _set("peer", 0, "pin_sha256", value="abcd"), ("peer[0].pin_sha256",
                                                              "SHA-256")),
    ("pin not hex", _set("peer", 0, "pin_sha256", value="zz" * 32), ("peer[0].pin_sha256",)),
    ("pin long", _set("peer", 0, "pin_sha256", value="ab" * 33), ("peer[0].pin_sha256",)),
]

BAD_CHANNELS = ["a/b", ".", "..", "", "x" * 65, "caf\u00e9", "sp ace", "nul\x00"]
BAD_CONNECTS = ["bravo.example", "bravo.example:", ":7443", "bravo:0", "bravo:65536",
                "bravo:http", "::1:7443", "[::1]", "[::1]7443", "[bravo]:7443",
                "bra vo:7443", "bravo:+443", "bravo:\u0661\u0662"]


@pytest.mark.parametrize("label,change,mentions", ERRORS, ids=[e[0] for e in ERRORS])
def test_config_errors_name_the_key(tmp_path: Path, label: str,
                                    change: Callable[[dict[str, Any]], None],
                                    mentions: tuple[str, ...]) -> None:
    message = error(tmp_path, change)
    for mention in mentions:
        assert mention in message, message


@pytest.mark.parametrize("name", BAD_CHANNELS)
def test_bad_channel_names(tmp_path: Path, name: str) -> None:
    message = error(tmp_path, _set("peer", 0, "channel", 0, "name", value=name))
    assert "peer[0].channel[0].name" in message and "channel name" in message


@pytest.mark.parametrize("text", BAD_CONNECTS)
def test_bad_connect(tmp_path: Path, text: str) -> None:
    message = error(tmp_path, _set("peer", 0, "connect", value=text))
    assert "peer[0].connect" in message and "host:port" in message


def test_channel_names_at_the_limits_are_fine(tmp_path: Path) -> None:
    names = ["x" * 64, "a.b", "A_b-9", "...", ".hidden"]
    cfg = load(tmp_path, _set("peer", 0, "channel",
                              value=[{"name": n} for n in names]))
    assert [c.name for c in cfg.peers[0].channels] == names


def test_an_unprintable_key_is_escaped_onto_one_line(tmp_path: Path) -> None:
    message = error(tmp_path, _set("node", "bad\nkey", value=1))
    assert '"bad\\nkey"' in message


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and "not found" in str(info.value)


def test_config_path_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="folder"):
        load_config(tmp_path)


def test_unreadable_config_file(tmp_path: Path) -> None:
    if not modes_are_enforced(tmp_path):
        pytest.skip("file modes do not bind us (root)")
    path = write(tmp_path, copy.deepcopy(BASE))
    path.chmod(0)
    with pytest.raises(ConfigError, match="permission denied"):
        load_config(path)


def test_bad_toml_names_file_toml_and_position(tmp_path: Path) -> None:
    message = error(tmp_path, '[node\nname = "alpha"\n')
    assert "TOML" in message and "line 1" in message and "column" in message


def test_duplicate_toml_key_is_bad_toml(tmp_path: Path) -> None:
    message = error(tmp_path, '[node]\nname = "a"\nname = "b"\n')
    assert "TOML" in message


def test_non_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "linkd.toml"
    path.write_bytes(b'[node]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


# ---------------------------------------------------------------------------
# The example configurations in config/
# ---------------------------------------------------------------------------

def _keys(doc: dict[str, Any], prefix: str = "") -> set[str]:
    found: set[str] = set()
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found |= _keys(value, f"{name}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                found |= _keys(item, f"{name}.")
        else:
            found.add(name)
    return found


CONTRACT_KEYS = {
    "node.name", "node.spool_dir", "node.state_dir", "node.status_socket", "node.file_mode",
    "node.spool_group", "node.log_level", "status.metrics_listen",
    "node.audit_checkpoint_lines",
    "tls.cert", "tls.key", "tls.ca", "tls.crl", "tls.require_post_quantum",
    "listen.address", "listen.port",
    "link.heartbeat_interval", "link.heartbeat_timeout", "link.reconnect_min",
    "link.reconnect_max", "link.handshake_timeout", "link.archive_sent",
    "link.quarantine_max_files", "link.quarantine_max_bytes",    # issue 8 (beyond §2)
    "link.priority_hold",                                         # issue 13 (beyond §2)
    "peer.name", "peer.connect", "peer.pin_sha256",
    "peer.channel.name", "peer.channel.priority", "peer.channel.max_message_bytes",
}


def test_every_scalar_key_has_an_example_for_its_error_line() -> None:
    # a wrong type says "write e.g. <key> = <value>": never "<key> = ..."
    import linkd.config as c
    keys = [k for t in (c._NODE_KEYS, c._STATUS_KEYS, c._TLS_KEYS, c._LISTEN_KEYS,
                        c._LINK_KEYS, c._PEER_KEYS, c._CHANNEL_KEYS) for k in t]
    assert [k for k in keys if k != "channel" and c._example("x", k) == "..."] == []


@pytest.mark.parametrize("name", ["linkd.example.toml", "interpol.toml", "europol.toml"])
def test_example_configs_load(name: str) -> None:
    cfg = load_config(EXAMPLES / name)
    assert cfg.peers and all(p.channels for p in cfg.peers)


def test_the_full_example_shows_every_key_with_its_default() -> None:
    path = EXAMPLES / "linkd.example.toml"
    assert _keys(tomllib.loads(path.read_text())) == CONTRACT_KEYS
    cfg = load_config(path)
    assert cfg.link == LinkConfig()
    assert cfg.node.file_mode == 0o640
    assert cfg.listen == ListenConfig()
    assert cfg.node.log_level == "info" and cfg.status.metrics_listen == ("127.0.0.1", 9464)


def test_the_two_site_example_fits_together() -> None:
    interpol = load_config(EXAMPLES / "interpol.toml")
    europol = load_config(EXAMPLES / "europol.toml")
    assert interpol.node.name == "interpol" and europol.node.name == "europol"
    assert interpol.listen is not None and interpol.listen.port == 7443
    assert europol.listen is None
    to_interpol = europol.peer("interpol")
    to_europol = interpol.peer("europol")
    assert to_interpol is not None and to_europol is not None
    assert to_interpol.connect is not None and to_interpol.connect[1] == 7443
    assert to_europol.connect is None
    for peer in (to_interpol, to_europol):
        channels = {c.name: c for c in peer.channels}
        assert set(channels) == {"alerts", "cases", "bulk"}
        assert channels["alerts"].priority == 10
        assert channels["bulk"].max_message_bytes == 4 << 30
