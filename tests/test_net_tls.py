"""Real TLS over trio memory streams with trustme certificates: who gets in, who does not."""

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from memlink import node_config

from linkd.config import (ChannelConfig, Config, LinkConfig, ListenConfig, NodeConfig,
                          PeerConfig, TLSConfig)
from linkd.net.tls import IdentityError, identify, make_contexts


def peer(name: str, pin: str | None = None) -> PeerConfig:
    return PeerConfig(name=name, pin_sha256=pin, channels=(ChannelConfig("data"),))


async def handshake(server_cfg: Config, client_cfg: Config):
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, make_contexts(server_cfg).server, server_side=True)
    client = trio.SSLStream(right, make_contexts(client_cfg).client, server_hostname=None)
    results = {}

    async def side(name, stream):
        try:
            await stream.do_handshake()
            results[name] = stream
        except trio.BrokenResourceError as exc:
            results[name] = exc
            await trio.aclose_forcefully(stream)   # as the daemon does: the other side sees EOF

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, "server", server)
            nursery.start_soon(side, "client", client)
    return results["server"], results["client"]


async def test_good_peers_identify_each_other(tmp_path):
    ca = trustme.CA()
    alpha = node_config(tmp_path, ca, "alpha", [peer("bravo")])
    bravo = node_config(tmp_path, ca, "bravo", [peer("alpha")])
    server, client = await handshake(bravo, alpha)
    assert server.version() == "TLSv1.3"
    assert identify(server.getpeercert(True), list(bravo.peers)).peer.name == "alpha"
    assert identify(client.getpeercert(True), list(alpha.peers)).peer.name == "bravo"


async def test_a_certificate_naming_another_node_is_refused(tmp_path):
    ca = trustme.CA()
    mallory = node_config(tmp_path, ca, "mallory", [peer("bravo")])
    bravo = node_config(tmp_path, ca, "bravo", [peer("alpha")])
    server, _client = await handshake(bravo, mallory)
    with pytest.raises(IdentityError, match="mallory"):
        identify(server.getpeercert(True), list(bravo.peers))


async def test_pin_mismatch_is_refused_and_a_matching_pin_accepted(tmp_path):
    ca = trustme.CA()
    alpha = node_config(tmp_path, ca, "alpha", [peer("bravo")])
    bravo = node_config(tmp_path, ca, "bravo", [peer("alpha", pin="0" * 64)])
    server, _ = await handshake(bravo, alpha)
    der = server.getpeercert(True)
    with pytest.raises(IdentityError, match="pin_sha256"):
        identify(der, list(bravo.peers))
    import hashlib
    good = [peer("alpha", pin=hashlib.sha256(der).hexdigest())]
    assert identify(der, good).peer.name == "alpha"


async def test_a_certificate_from_another_ca_fails_the_handshake(tmp_path):
    alpha = node_config(tmp_path, trustme.CA(), "alpha", [peer("bravo")])
    bravo = node_config(tmp_path, trustme.CA(), "bravo", [peer("alpha")])
    server, client = await handshake(bravo, alpha)
    assert isinstance(client, trio.BrokenResourceError)
    assert isinstance(client.__cause__, ssl.SSLError)


def test_contexts_allow_only_tls_1_3(tmp_path):
    cfg = node_config(tmp_path, trustme.CA(), "alpha", [peer("bravo")])
    contexts = make_contexts(cfg)
    for ctx in (contexts.server, contexts.client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_no_certificate_is_refused():
    with pytest.raises(IdentityError, match="no certificate"):
        identify(None, [peer("alpha")])
