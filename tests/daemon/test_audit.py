"""The tamper-evident audit log of real daemons (issue 10): every change to a line is
named by `linkctl audit verify`; a cut tail only with the peer's log (its witness);
a SIGKILL under traffic leaves a chain that verifies and holds every delivery the
peer has a receipt for."""

import json
import os
import shutil
import signal
import time

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from procs import make_pair, start_connected, stop_all, wait_for

from linkd.cli.linkctl_main import main as linkctl
from linkd.evidence import audit as A
from linkd.evidence import keys
from linkd.evidence import receipts as R


def with_checkpoints(d, every):
    original = d.write_config

    def write_config():
        original()
        text = d.config_path.read_text()
        d.config_path.write_text(text.replace("[node]\n",
                                              f"[node]\naudit_checkpoint_lines = {every}\n", 1))
    d.write_config = write_config


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """alpha sends 12 files to bravo, both stop cleanly: (alpha's log, bravo's log)."""
    tmp = tmp_path_factory.mktemp("audit")
    a, b = make_pair(tmp, start=False)
    for d in (a, b):
        with_checkpoints(d, 5)
    try:
        start_connected(a, b)
        for i in range(12):
            a.drop("bravo", "data", f"f{i}.txt", f"file {i}".encode())
        wait_for(lambda: len(b.inbound("alpha", "data")) == 12, 30)
        wait_for(lambda: not any(a.out_dir("bravo", "data").iterdir()), 30)
        wait_for(lambda: len(a.events("message_sent")) == 12, 10)
        # bravo has witnessed a checkpoint of alpha made after the traffic
        wait_for(lambda: any(e["checkpoint"]["line"] > 20 for e in b.events("audit_witness")),
                 10)
        assert a.stop() == 0 and b.stop() == 0
    finally:
        stop_all(a, b)
    return a.state / "audit" / "audit.jsonl", b.state / "audit" / "audit.jsonl", a, b


def verify(capsys, *args):
    code = linkctl(["audit", "verify", *args])
    out = capsys.readouterr()
    return code, (out.out + out.err).strip()


def test_a_clean_log_verifies_alone_and_against_the_peer(logs, capsys):
    alog, blog, _a, _b = logs
    code, text = verify(capsys, "--log", str(alog))
    assert code == 0 and text.startswith("audit log OK: ") and "last checkpoint line" in text
    assert text.count("\n") == 0
    assert verify(capsys, "--log", str(alog), "--peer-log", str(blog))[0] == 0
    assert verify(capsys, "--log", str(blog), "--peer-log", str(alog))[0] == 0
    lines = [json.loads(x) for x in alog.read_text().splitlines()]
    events = [x["event"] for x in lines]
    assert events.count("message_queued") == 12 and events.count("message_sent") == 12
    assert events[-1] == "audit_checkpoint"           # the last line, at shutdown
    assert sum(e == "audit_checkpoint" for e in events) >= 4
    delivered = [x for x in blog.read_text().splitlines() if '"message_delivered"' in x]
    assert len(delivered) == 12
    # each side witnessed the other
    assert any(x["event"] == "audit_witness" and x["peer"] == "bravo" for x in lines)


def _mutate(path, tmp_path, how, k):
    lines = path.read_bytes().split(b"\n")[:-1]
    i = k - 1
    if how == "edit":
        lines[i] = lines[i].replace(b"\"timestamp\":\"20", b"\"timestamp\":\"19")
        assert b"\"timestamp\":\"19" in lines[i]
    elif how == "insert":
        lines.insert(i, lines[i + 3])
    elif how == "delete":
        del lines[i]
    elif how == "reorder":
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    elif how == "truncate":
        lines[i] = lines[i][: len(lines[i]) // 2]
    out = tmp_path / f"{how}.jsonl"
    out.write_bytes(b"".join(x + b"\n" for x in lines))
    return out


@pytest.mark.parametrize("how", ["edit", "insert", "delete", "reorder", "truncate"])
def test_any_change_to_one_line_is_named(logs, tmp_path, capsys, how):
    alog = logs[0]
    k = 9
    code, text = verify(capsys, "--log", str(_mutate(alog, tmp_path, how, k)))
    assert code == 1 and text.count("\n") == 0, text
    assert "audit log NOT OK" in text
    named = f"line {k + 1}" if how == "edit" else f"line {k}"
    assert named in text, text


def test_a_forged_checkpoint_signature_is_found(logs, tmp_path, capsys):
    alog = logs[0]
    lines = alog.read_bytes().split(b"\n")[:-1]
    k = next(i for i, x in enumerate(lines) if b'"audit_checkpoint"' in x)
    obj = json.loads(lines[k])
    obj["why"] = "forged"            # re-chain everything after it so only the sig is wrong
    lines[k] = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    for j in range(k + 1, len(lines)):
        o = json.loads(lines[j])
        o["prev"] = A.line_hash(lines[j - 1])
        lines[j] = json.dumps(o, ensure_ascii=False, separators=(",", ":")).encode()
    bad = tmp_path / "forged.jsonl"
    bad.write_bytes(b"".join(x + b"\n" for x in lines))
    code, text = verify(capsys, "--log", str(bad))
    assert code == 1 and f"line {k + 1}: checkpoint signature does not verify" in text, text


def test_a_cut_tail_is_found_only_with_the_peers_log(logs, tmp_path, capsys):
    alog, blog = logs[0], logs[1]
    witnessed = [json.loads(x)["checkpoint"]["line"] for x in blog.read_text().splitlines()
                 if '"audit_witness"' in x and '"node":"alpha"' in x]
    assert witnessed
    last = max(witnessed)
    lines = alog.read_bytes().split(b"\n")[:-1]
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(x + b"\n" for x in lines[: last - 1]))
    assert verify(capsys, "--log", str(cut))[0] == 0
    code, text = verify(capsys, "--log", str(cut), "--peer-log", str(blog))
    assert code == 1 and "tail cut" in text and f"line {last}" in text, text


def test_an_export_bundle_verifies_offline(logs, tmp_path, capsys):
    alog = logs[0]
    times = [json.loads(x)["timestamp"] for x in alog.read_text().splitlines()]
    bundle = tmp_path / "bundle.json"
    assert linkctl(["audit", "export", "--log", str(alog), "--since", times[10],
                    "--until", times[20], "-o", str(bundle)]) == 0
    capsys.readouterr()
    code, text = verify(capsys, "--log", str(bundle))
    assert code == 0, text
    doc = json.loads(bundle.read_text())
    edited = json.loads(doc["lines"][3])["line"]
    doc["lines"][3] = doc["lines"][3].replace('"timestamp":"20', '"timestamp":"19')
    bundle.write_text(json.dumps(doc))
    code, text = verify(capsys, "--log", str(bundle))
    # fourth operator trial: the message counted positions in the bundle as "lines"
    # and named the line before the edited one
    assert code == 1 and (f"entry 5 (audit line {edited + 1}): does not chain to the line "
                          f"before it (entry 4, audit line {edited}, was edited") in text, text


def test_verify_names_the_signer_and_checks_it_against_the_ca(logs, tmp_path, capsys):
    # second operator trial: a log or bundle signed with a key of anyone's own (another
    # CA) verified "OK" and never said who signed it
    from linkd import pki
    alog, _blog, a, _b = logs
    code, text = verify(capsys, "--log", str(alog))
    assert code == 0 and "signed by CN=alpha" in text and "give --ca" in text, text
    code, text = verify(capsys, "--log", str(alog), "--ca", str(a.pki_dir / "ca.crt"))
    assert code == 0 and "give --ca" not in text, text
    other = tmp_path / "other-ca"
    pki.init_ca(other)
    code, text = verify(capsys, "--log", str(alog), "--ca", str(other / "ca.crt"))
    assert code == 1 and "does not chain to the given CA" in text, text


def test_verify_says_which_lines_no_signature_covers(logs, tmp_path, capsys):
    # second operator trial: the checkpoint at the end removed and lines after the one
    # before it edited (their chain recomputed), a bundle verified "OK" for them all
    alog = logs[0]
    raw = alog.read_bytes().split(b"\n")[:-1]
    cut = tmp_path / "audit.jsonl"
    cut.write_bytes(b"\n".join(raw[:-1]) + b"\n")        # without its last checkpoint
    code, text = verify(capsys, "--log", str(cut))
    last_ck = max(i for i, x in enumerate(raw[:-1], start=1)
                  if b'"event":"audit_checkpoint"' in x)
    assert code == 0 and f"lines {last_ck + 1}-{len(raw) - 1} after it are not signed" \
        in text, text


def test_an_export_bundle_verifies_against_the_peers_log(logs, tmp_path, capsys):
    # second operator trial: a slice ending before the log's end was "tail cut"
    # against the peer's witnesses of later checkpoints
    alog, blog, _a, _b = logs
    times = [json.loads(x)["timestamp"] for x in alog.read_text().splitlines()]
    bundle = tmp_path / "bundle.json"
    assert linkctl(["audit", "export", "--log", str(alog), "--since", times[5],
                    "--until", times[15], "-o", str(bundle)]) == 0
    capsys.readouterr()
    code, text = verify(capsys, "--log", str(bundle), "--peer-log", str(blog))
    assert code == 0, text


def test_receipt_show_of_a_name_sent_twice_says_so(tmp_path, capsys):
    # second operator trial: dup.txt sent three times (delivered as dup.txt, dup~1.txt,
    # dup~2.txt): `receipt show --name dup.txt` picked one without a word
    store = R.ReceiptStore(tmp_path / "receipts")
    path = store.path("bravo", "data")
    path.parent.mkdir(parents=True)
    with open(path, "w") as f:
        for seq, delivered in ((4, "dup.txt"), (7, "dup~1.txt"), (9, "dup~2.txt")):
            f.write(json.dumps({"receipt": {"seq": seq, "sent_name": "dup.txt",
                                            "delivered_name": delivered}}) + "\n")
    assert [d["receipt"]["seq"] for d in store.find_all("bravo", "data", name="dup.txt")] \
        == [4, 7, 9]
    from linkd.cli.evidence_cmd import receipt_show
    assert receipt_show(tmp_path, "bravo", "data", None, "dup.txt") == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["receipt"]["seq"] == 9
    assert "3 receipts match dup.txt (seq 4, 7, 9)" in out.err and "--seq" in out.err
    assert receipt_show(tmp_path, "bravo", "data", 7, None) == 0
    assert capsys.readouterr().err == ""


def test_an_export_of_an_empty_range_is_one_line(logs, tmp_path, capsys):
    # second operator trial: --since after --until exported one line, a --since in the
    # future 17 earlier lines, both "successfully"
    alog = logs[0]
    out = tmp_path / "b.json"
    assert linkctl(["audit", "export", "--log", str(alog), "--since", "2026-12-02T12:00:00Z",
                    "--until", "2026-12-02T11:00:00Z", "-o", str(out)]) == 1
    assert "swap them" in capsys.readouterr().err and not out.exists()
    assert linkctl(["audit", "export", "--log", str(alog), "--since", "2099-01-01T00:00:00Z",
                    "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to export" in err and not out.exists()


def test_receipt_show_and_verify_a_real_delivery(logs, capsys, tmp_path):
    _alog, _blog, a, b = logs
    assert linkctl(["-c", str(a.config_path), "receipt", "show", "--peer", "bravo",
                    "--channel", "data", "--name", "f3.txt"]) == 0
    doc = capsys.readouterr().out
    (tmp_path / "r.json").write_text(doc)
    (tmp_path / "f3.txt").write_bytes(b"file 3")
    assert linkctl(["receipt", "verify", str(tmp_path / "r.json"), "--cert",
                    str(a.pki_dir / "bravo.crt"), "--ca", str(a.pki_dir / "ca.crt"),
                    "--file", str(tmp_path / "f3.txt")]) == 0
    assert "receipt OK" in capsys.readouterr().out
    assert linkctl(["receipt", "verify", str(tmp_path / "r.json"), "--cert",
                    str(a.pki_dir / "alpha.crt"), "--ca", str(a.pki_dir / "ca.crt")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_sigkill_under_traffic_leaves_a_chain_with_every_receipted_delivery(tmp_path, capsys):
    a, b = make_pair(tmp_path, start=False)
    try:
        start_connected(a, b)
        n = 400
        for i in range(n):
            a.drop("bravo", "data", f"m{i:04d}.bin", os.urandom(2000))
        receipts = a.state / "receipts" / "bravo" / "data.jsonl"
        wait_for(lambda: receipts.exists() and receipts.read_bytes().count(b"\n") >= 60, 60)
        b.kill()                                  # SIGKILL, mid-stream
        time.sleep(0.2)
        a.stop(signal.SIGTERM)
    finally:
        stop_all(a, b)
    blog = b.state / "audit" / "audit.jsonl"
    code, text = verify(capsys, "--log", str(blog))
    assert code == 0, text
    delivered = {(o["seq"], o["sha256"]) for o in map(json.loads, blog.read_text().splitlines())
                 if o.get("event") == "message_delivered"}
    store = R.ReceiptStore(a.state / "receipts")
    receipted = set()
    for raw in store.path("bravo", "data").read_text().splitlines():
        r = json.loads(raw)["receipt"]
        receipted.add((r["seq"], r["sha256"]))
    assert len(receipted) >= 60
    missing = receipted - delivered
    assert not missing, sorted(missing)[:5]


def test_a_line_is_the_event_as_compact_json_with_the_chain_fields_first(tmp_path):
    """The line format the verifier and other tools read: `line` and `prev` first (set
    by the log, never by the event), then the event's own fields, compact JSON."""
    log = A.AuditLog(tmp_path / "audit", "alpha", None)
    log.open()
    event = {"event": "message_sent", "peer": "bravo", "name": "réport.pdf", "seq": 7,
             "line": 999, "prev": "forged", "when": object()}
    log.record(event)
    log.record({"event": "message_queued", "name": "x"})
    log.close()
    lines = (tmp_path / "audit" / "audit.jsonl").read_bytes().splitlines()
    first = {k: v for k, v in event.items() if k not in ("line", "prev")}
    want = json.dumps({"line": 1, "prev": A.ZERO, **first}, ensure_ascii=False,
                      separators=(",", ":"), default=str).encode()
    assert lines[0] == want
    assert json.loads(lines[1]) == {"line": 2, "prev": A.line_hash(lines[0]),
                                    "event": "message_queued", "name": "x"}
    assert event["line"] == 999                 # the caller's dict is left alone


def test_the_tail_finds_delivered_lines_by_content_and_across_a_rotation(tmp_path):
    """What recovery asks before logging a delivery again (linkd/net/peer.py): a line
    for the same peer, channel, seq *and* content, in the current file or, when the
    current file is short, at the end of the newest rotated one."""
    log = A.AuditLog(tmp_path / "audit", "bravo", None)
    log.open()
    start = time.time()

    def delivered(seq: int, sha: str, channel: str = "data") -> None:
        log.record({"event": "message_delivered", "peer": "alpha", "channel": channel,
                    "seq": seq, "sha256": sha, "timestamp": A._now()})
    delivered(1, "a" * 64)
    delivered(2, "b" * 64)
    log._rotate()                                   # as a checkpoint past max_bytes does
    delivered(3, "c" * 64)
    delivered(5, "e" * 64, channel="other")
    wanted = {1: "a" * 64, 2: "f" * 64, 3: "c" * 64, 4: "d" * 64, 5: "e" * 64}

    def found(peer: str, channel: str) -> set[int]:
        tail = log.tail()
        return {s for s, sha in wanted.items() if (peer, channel, s, sha) in tail.delivered}
    assert found("alpha", "data") == {1, 3}         # 2: other content; 4: never logged
    assert found("alpha", "other") == {5}
    assert found("charlie", "data") == set()
    # a short tail: only the newest lines, and `since` is the first whole line's time
    tail = log.tail(tail_bytes=len((tmp_path / "audit" / "audit.jsonl").read_bytes()))
    assert ("alpha", "data", 1, "a" * 64) not in tail.delivered
    assert ("alpha", "data", 3, "c" * 64) in tail.delivered
    assert start - 1 <= tail.since <= time.time()
    # the newest rotated file moved away: an older one is not taken for it
    rotated = A.rotated_files(tmp_path / "audit")
    log._rotate()
    delivered(6, "6" * 64)
    rotated_again = A.rotated_files(tmp_path / "audit")
    rotated_again[-1].rename(tmp_path / "moved-away.jsonl")
    assert rotated == A.rotated_files(tmp_path / "audit")
    assert found("alpha", "data") == set()          # 1 and 3 are in files not read
    log.close()


def test_a_failed_fsync_fails_the_log_for_good(tmp_path, monkeypatch):
    """Linux reports a failed write-back once per file: the next fsync "succeeds" with
    the lines lost. So the first failure must mark the log failed (deliveries are then
    refused, linkd/net/receiver.py), not be forgotten by the next sync."""
    log = A.AuditLog(tmp_path / "audit", "bravo", None)
    log.open()
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 1})
    real = os.fsync
    calls = []

    def failing_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real(fd)
    monkeypatch.setattr(A.os, "fsync", failing_once)
    with pytest.raises(OSError):
        log.sync()
    assert "cannot be written (Input/output error)" in log.refusal()
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 2})
    with pytest.raises(OSError):
        log.sync()                                  # still failed, not "fine" again
    monkeypatch.setattr(A.os, "fsync", real)
    # not a full disk: nothing can say what was lost, so only a restart carries on
    assert not log.resumable() and not log.resume()
    assert "restart linkd" in log.refusal()
    log.close()


def full_disk_once(monkeypatch, fragment: bool):
    """os.write in the audit module fails once with ENOSPC (after half the bytes went
    in when `fragment`), then works: a disk that filled up and was freed."""
    real = os.write
    done: list[bool] = []

    def write(fd, data):
        if not done:
            done.append(True)
            if fragment:
                real(fd, bytes(data)[:len(data) // 2])
            raise OSError(28, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(A.os, "write", write)


@pytest.mark.parametrize("fragment", [False, True], ids=["clean", "torn"])
def test_a_log_failed_by_a_full_disk_resumes_and_still_verifies(tmp_path, monkeypatch,
                                                               capsys, fragment):
    """Found in an operator's trial: the audit log shared a disk that filled up; every
    delivery was then refused until linkd was restarted, long after space was freed."""
    cert = trustme.CA().issue_cert("bravo", common_name="bravo")
    signer = keys.Signer(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()),
                         load_pem_private_key(cert.private_key_pem.bytes(), None))
    log = A.AuditLog(tmp_path / "audit", "bravo", signer, checkpoint_lines=4)
    log.open()
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 1})
    full_disk_once(monkeypatch, fragment)
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 2})   # lost
    assert log.failed is not None and log.resumable()
    assert "linkd carries on by itself" in log.refusal()
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 3})   # dropped
    assert log.resume() is True
    assert log.failed is None and log.refusal() == ""
    log.record({"event": "message_delivered", "peer": "alpha", "seq": 4})
    log.sync()
    log.close()
    lines = [json.loads(x) for x in log.path.read_bytes().splitlines()]
    events = [(o["event"], o.get("seq")) for o in lines]
    assert ("audit_resumed", None) in events
    assert [s for e, s in events if e == "message_delivered"] == [1, 4]
    assert (("audit_torn_tail", None) in events) == fragment
    assert [o["line"] for o in lines] == list(range(1, len(lines) + 1))
    code, out = verify(capsys, "--log", str(log.path))
    assert code == 0, out



def test_a_state_folder_this_user_cannot_read_is_one_line(logs, monkeypatch, capsys):
    # operator trial: `linkctl -c CONFIG audit verify` (and `receipt show`) run by a
    # user outside the daemon's state folder ended in a PermissionError traceback
    _alog, _blog, a, _b = logs
    folder = a.state / "audit"

    def closed(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(A, "rotated_files", closed)
    code = linkctl(["-c", str(a.config_path), "audit", "verify"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert str(folder) in err and "permission denied" in err and "root" in err


# -- a renewed certificate (an operator trial: a leaked key, revoked and re-issued) --

def _renewal_pki(tmp_path):
    from linkd import pki
    directory = tmp_path / "pki"
    pki.init_ca(directory)
    pki.issue(directory, "alpha")
    old = keys.Signer.from_files(directory / "alpha.crt", directory / "alpha.key")
    pki.issue(directory, "alpha", force=True)
    new = keys.Signer.from_files(directory / "alpha.crt", directory / "alpha.key")
    assert old.cert_sha256 != new.cert_sha256
    return directory, old, new


def _signers(path):
    """[(event, why or cert_sha256, signer)] of the key and checkpoint lines."""
    out = []
    for raw in path.read_bytes().splitlines():
        o = json.loads(raw)
        if o["event"] == "audit_key":
            out.append(("audit_key", o["cert_sha256"], None))
        elif o["event"] == "audit_checkpoint":
            out.append(("audit_checkpoint", o["why"], o["signer"]))
    return out


def test_a_renewed_key_signs_the_checkpoints_after_it_and_the_log_verifies(tmp_path, capsys):
    """The reload of a renewed certificate left checkpoints signed by the old, revoked
    key until a restart: the old key signs up to the switch, the new one after it,
    and the log carries both certificates (verified against the CA)."""
    pki_dir, old, new = _renewal_pki(tmp_path)
    log = A.AuditLog(tmp_path / "audit", "alpha", old, checkpoint_lines=3)
    log.open()
    for seq in range(4):
        log.record({"event": "message_sent", "peer": "bravo", "seq": seq})
    last_old = log.renew(new)
    assert last_old is not None
    assert json.loads(last_old)["signer"] == old.cert_sha256
    assert log.renew(new) is None               # the same certificate again: nothing
    for seq in range(4, 8):
        log.record({"event": "message_sent", "peer": "bravo", "seq": seq})
    log.close()
    marks = _signers(log.path)
    switch = marks.index(("audit_key", new.cert_sha256, None))
    assert marks[switch - 1] == ("audit_checkpoint", "renewing", old.cert_sha256)
    assert marks[switch + 1] == ("audit_checkpoint", "renewed", new.cert_sha256)
    assert {s for e, _, s in marks[:switch] if e == "audit_checkpoint"} == {old.cert_sha256}
    assert {s for e, _, s in marks[switch:] if e == "audit_checkpoint"} == {new.cert_sha256}
    assert marks[-1] == ("audit_checkpoint", "shutdown", new.cert_sha256)
    code, out = verify(capsys, "--log", str(log.path), "--ca", str(pki_dir / "ca.crt"))
    assert code == 0 and "lines" in out and "not signed yet" not in out, out


def test_a_key_renewed_while_the_log_cannot_be_written_is_logged_before_it_signs(
        tmp_path, monkeypatch, capsys):
    """A renewal while the disk is full: the log resumes with the new key, and the
    new certificate's audit_key line comes before the first checkpoint it signs."""
    pki_dir, old, new = _renewal_pki(tmp_path)
    log = A.AuditLog(tmp_path / "audit", "alpha", old)
    log.open()
    full_disk_once(monkeypatch, fragment=False)
    log.record({"event": "message_sent", "peer": "bravo", "seq": 1})     # fails the log
    assert log.failed is not None
    assert log.renew(new) is None               # nothing written (nothing can be)
    assert log.resume() is True
    log.close()
    marks = _signers(log.path)
    assert marks[-3:] == [("audit_key", new.cert_sha256, None),
                          ("audit_checkpoint", "resumed", new.cert_sha256),
                          ("audit_checkpoint", "shutdown", new.cert_sha256)]
    code, out = verify(capsys, "--log", str(log.path), "--ca", str(pki_dir / "ca.crt"))
    assert code == 0, out


def test_after_a_key_renewal_and_reload_the_peer_witnesses_every_checkpoint(tmp_path, capsys):
    """The operator trial, as docs/OPERATIONS.md says for a leaked key: revoke, issue
    anew, install the certificate, key and CRL on both sites, reload both. The peer
    refused every checkpoint after it (audit_witness_refused, still signed by the
    revoked key) until alpha was restarted."""
    from linkd import pki
    a, b = make_pair(tmp_path)
    try:
        pki.revoke(a.pki_dir, "alpha")
        pki.issue(a.pki_dir, "alpha", force=True)
        renewed = keys.cert_sha256(keys.der(keys.load_certs(a.pki_dir / "alpha.crt")[0]))
        for d in (a, b):
            d.tls_extra["crl"] = d.pki_dir / "ca.crl"
        a.reload()
        # bravo sees the new certificate at once: it witnesses a checkpoint of the new key
        wait_for(lambda: any(e["checkpoint"]["signer"] == renewed
                             for e in b.events("audit_witness")), 15)
        b.reload()
        a.wait_state("bravo")
        b.wait_state("alpha")
        a.drop("bravo", "data", "after.txt", b"sent after the renewal")
        wait_for(lambda: "after.txt" in b.inbound("alpha", "data"), 15)
        assert a.stop() == 0 and b.stop() == 0
    finally:
        stop_all(a, b)
    assert not a.events("audit_witness_refused") and not b.events("audit_witness_refused")
    alog, blog = a.state / "audit" / "audit.jsonl", b.state / "audit" / "audit.jsonl"
    marks = _signers(alog)
    switch = marks.index(("audit_key", renewed, None))
    assert {s for e, _, s in marks[switch:] if e == "audit_checkpoint"} == {renewed}
    assert marks[-1] == ("audit_checkpoint", "shutdown", renewed)
    assert (a.state / "certs" / f"{renewed}.pem").exists()
    # the witnessed checkpoints match alpha's lines, across the renewal
    assert any(e["checkpoint"]["signer"] != renewed for e in b.events("audit_witness"))
    ca = str(a.pki_dir / "ca.crt")
    code, out = verify(capsys, "--log", str(alog), "--peer-log", str(blog), "--ca", ca)
    assert code == 0, out
    code, out = verify(capsys, "--log", str(blog), "--peer-log", str(alog), "--ca", ca)
    assert code == 0, out


def test_a_peer_whose_audit_log_went_back_is_called_out(tmp_path):
    # fourth operator trial: bravo's state_dir was restored from an older copy; alpha
    # had witnessed bravo's checkpoint of line 4438, then witnessed one of line 4408
    # without a word, although noticing that is what a witness is for
    a, b = make_pair(tmp_path, start=False)
    for d in (a, b):
        with_checkpoints(d, 5)
    try:
        start_connected(a, b)
        assert b.stop() == 0
        backup = tmp_path / "bravo-state-backup"
        shutil.copytree(b.state, backup, symlinks=True)
        b.start()
        a.wait_state("bravo")
        for i in range(6):
            b.drop("alpha", "data", f"g{i}.txt", b"later")
        wait_for(lambda: len(a.inbound("bravo", "data")) == 6, 30)
        top = max(e["checkpoint"]["line"] for e in a.events("audit_witness"))
        assert b.stop() == 0
        shutil.rmtree(b.state)
        shutil.copytree(backup, b.state, symlinks=True)    # the restore
        b.start()
        went = wait_for(lambda: a.events("audit_went_back"), 20)[0]
        assert went["witnessed_line"] >= top and went["line"] < went["witnessed_line"], went
        assert "state_dir was restored from an older copy" in went["reason"]
        lines = (a.state / "audit" / "audit.jsonl").read_text()
        assert '"audit_went_back"' in lines
    finally:
        stop_all(a, b)


def test_an_export_to_an_unsigned_end_says_so_and_a_reload_signs_one(tmp_path, capsys):
    # fourth operator trial: with no checkpoint after --until yet, export took the log
    # to its unsigned end and exited 0 without a word (EVIDENCE.md: "both ends are
    # signed"), and only a restart wrote a checkpoint
    a, b = make_pair(tmp_path)
    try:
        a.wait_state("bravo")
        a.drop("bravo", "data", "x.txt", b"x")
        wait_for(lambda: b.inbound("alpha", "data"), 20)
        alog = a.state / "audit" / "audit.jsonl"
        wait_for(lambda: json.loads(alog.read_text().splitlines()[-1])["event"]
                 != "audit_checkpoint", 10)
        bundle = tmp_path / "b.json"
        capsys.readouterr()
        assert linkctl(["audit", "export", "--log", str(alog), "-o", str(bundle)]) == 0
        assert "the bundle ends unsigned" in capsys.readouterr().err
        a.reload()
        last = wait_for(lambda: [x for x in map(json.loads, alog.read_text().splitlines())
                                 if x["event"] == "audit_checkpoint"
                                 and x.get("why") == "reload"], 10)[-1]
        wait_for(lambda: any(e["checkpoint"]["line"] == last["line"]
                             for e in b.events("audit_witness")), 10)   # witnessed
        assert linkctl(["audit", "export", "--log", str(alog), "-o", str(bundle)]) == 0
        assert "ends unsigned" not in capsys.readouterr().err
        assert verify(capsys, "--log", str(bundle))[0] == 0
    finally:
        stop_all(a, b)
