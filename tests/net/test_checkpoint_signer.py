"""After a renewal, a session still under the old certificate is not sent the new
key's checkpoints (an operator trial: its peer, checking them with the certificate of
the session, refused each one as audit_witness_refused); the reload ends it, and the
next session, under the new certificate, carries them (tests/daemon/test_audit.py)."""

import json

import pytest
import trio
import trustme
from memlink import FakePeer, make_link, node_config, peer_config
from test_ack_evidence import run_against

from linkd.proto import frames as F


@pytest.fixture
def link(tmp_path):
    ca = trustme.CA()
    return make_link(node_config(tmp_path, ca, "alpha", [peer_config("bravo")]), "bravo")


def checkpoint(line: int, signer: str) -> bytes:
    return json.dumps({"line": line, "prev": "0" * 64, "event": "audit_checkpoint",
                       "node": "alpha", "why": "every", "signer": signer},
                      separators=(",", ":")).encode()


async def test_a_session_sends_only_the_checkpoints_its_own_key_signed(link):
    peer = FakePeer(None)

    async def until(runner, peer):
        await runner.opened.wait()
        assert runner.signer is not None
        runner.send_checkpoint(checkpoint(7, "ab" * 32))                 # another key's
        runner.send_checkpoint(checkpoint(8, runner.signer.cert_sha256))  # ours
        while not peer.of(F.Checkpoint):  # noqa: ASYNC110 (the peer's side)
            await trio.sleep(0.01)
    await run_against(link, peer, until)
    sent = [json.loads(f.line)["line"] for _t, f in peer.of(F.Checkpoint)]
    assert sent == [8]
