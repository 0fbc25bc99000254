# test_kpemu_protocol.py: the Key Protect client (through kms-probe) and the emulator (tests/kpemu) against each other
#
# No FUSE here: kms-probe drives keyclient's kms_* API and prints JSON lines; the emulator
# checks what the client sends and injects faults. Every probe run is also checked for leaks:
# its stdout and stderr must never hold the API key or any token the emulator issued.
import base64
import errno
import http.client
import json
import os
import re
import secrets
import ssl
import subprocess
import time
import urllib.parse
import uuid

import pytest

from helpers import APIKEY, NOACCESS_APIKEY, READER_APIKEY

BUILD_DIR = os.environ.get("KEYFS_BUILD_DIR", "")
PROBE = os.path.join(BUILD_DIR, "tests", "tools", "kms-probe") if BUILD_DIR else ""
# Test-only knob of the client (keyclient/kms-keyprotect.h): backoff 10, 20, 40, 80 ms.
BACKOFF_SCALE = "0.01"
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ACTION_TYPE = "application/vnd.ibm.kms.key_action+json"


@pytest.fixture(scope="session", autouse=True)
def keyfs_binaries():
    """Overrides conftest's: these tests need kms-probe, not the FUSE binaries. Missing is a failure."""
    if not PROBE or not os.access(PROBE, os.X_OK):
        pytest.fail("kms-probe missing (KEYFS_BUILD_DIR=%r): build tests/tools/kms-probe" % BUILD_DIR,
                    pytrace=False)
    return PROBE


class Result:
    def __init__(self, proc, elapsed):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.elapsed = elapsed
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        self.doc = json.loads(lines[-1]) if lines else None

    @property
    def ok(self):
        return self.rc == 0 and self.doc is not None and self.doc.get("ok") is True

    def __repr__(self):
        return "rc=%s stdout=%r stderr=%r" % (self.rc, self.stdout, self.stderr)


_counter = [0]


def probe(emu, tmp_path, *args, key=None, apikey=APIKEY, ca_file=True, endpoint=None, iam=None,
          instance=None, clear_instance=False, env=None, apikey_file=None, timeout=60):
    """Run kms-probe against emu with a fresh volume description; returns a Result."""
    _counter[0] += 1
    n = _counter[0]
    vol = tmp_path / ("keyfs-%d" % n)
    k = key if key is not None else emu.kid
    vol.write_text("format=1\nvolume=%s\nkms=keyprotect\nkey=%s\nkey_id=%s\nendpoint=%s\ninstance=%s\n"
                   "iam_endpoint=%s\ncreated=2026-01-01T00:00:00Z\n"
                   % (uuid.uuid4(), k, k.rsplit(":", 1)[-1], endpoint or emu.url,
                      instance or emu.instance, iam or emu.url))
    argv = [PROBE, "--voldesc", str(vol)]
    if apikey_file is None and apikey is not None:
        apikey_file = tmp_path / ("apikey-%d" % n)
        apikey_file.write_text(apikey + "\n")
        os.chmod(apikey_file, 0o600)
    if apikey_file is not None:
        argv += ["--apikey-file", str(apikey_file)]
    if ca_file is True:
        argv += ["--ca-file", emu.ca_file]
    elif ca_file:
        argv += ["--ca-file", ca_file]
    if clear_instance:
        argv.append("--clear-instance")
    e = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    e["KEYFS_TEST_BACKOFF_SCALE"] = BACKOFF_SCALE
    e["no_proxy"] = "127.0.0.1,localhost"       # the client honours https_proxy; the emulator is local
    e.update(env or {})
    t0 = time.monotonic()
    p = subprocess.run(argv + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=timeout, env=e)
    r = Result(p, time.monotonic() - t0)
    out = p.stdout + p.stderr
    for secret in [APIKEY, READER_APIKEY, NOACCESS_APIKEY] + list(emu.issued_tokens):
        assert secret not in out, "kms-probe printed a secret: %r" % out
    assert "Bearer" not in out
    return r


def aad():
    return [str(uuid.uuid4()), secrets.token_hex(16)]


def wrap(emu, tmp_path, a, **kw):
    r = probe(emu, tmp_path, "wrap", *a, **kw)
    assert r.ok, r
    return r.doc


def unwrap(emu, tmp_path, blob, a, **kw):
    return probe(emu, tmp_path, "unwrap", blob, *a, **kw)


def expect_error(r, err, *fragments):
    assert r.rc == 1, r
    assert r.doc["ok"] is False and r.doc["errno"] == err, r
    for frag in fragments:
        assert frag in r.doc["error"], "%r not in %r" % (frag, r.doc["error"])
    # One clear line on stderr too, the same message.
    assert r.stderr.strip() == "kms-probe: error: " + r.doc["error"]
    return r.doc["error"]


def kms_requests(emu, suffix):
    return [e for e in emu.requests(kind="kms") if e["path"].endswith(suffix)]


# ---- the client: round trips and the headers it sends ----

def test_wrap_unwrap_round_trip(emu, tmp_path):
    a = aad()
    w = wrap(emu, tmp_path, a)
    assert w["key_version"] == emu.key(emu.kid).latest["id"]
    assert re.fullmatch(r"[A-Za-z0-9+/]+=*", w["blob"]) and len(w["blob"]) <= 600
    u = unwrap(emu, tmp_path, w["blob"], a)
    assert u.ok, u
    assert u.doc == {"ok": True, "op": "unwrap", "dek_sha256": w["dek_sha256"], "rewrapped": False}

    wr, = kms_requests(emu, "/actions/wrap")
    un, = kms_requests(emu, "/actions/unwrap")
    for e, action in ((wr, "wrap"), (un, "unwrap")):
        assert e["method"] == "POST"
        assert e["path"] == "/api/v2/keys/%s/actions/%s" % (emu.kid, action)
        assert e["has_auth"] is True
        assert e["headers"]["bluemix-instance"] == emu.instance
        assert e["headers"]["accept"] == "application/json"
        assert e["headers"]["content-type"] == ACTION_TYPE
        assert UUID4.match(e["correlation_id"])
        assert e["status"] == 200
    # One correlation id per logical call.
    assert wr["correlation_id"] != un["correlation_id"]
    # Each probe process fetched one token with the form body IAM expects.
    iam = emu.token_requests()
    assert len(iam) == 2
    assert all(e["path"] == "/identity/token" and e["method"] == "POST" and not e["has_auth"] for e in iam)
    assert all(e["headers"]["content-type"] == "application/x-www-form-urlencoded" for e in iam)


def test_aad_binds_the_wrapped_key(emu, tmp_path):
    a = aad()
    w = wrap(emu, tmp_path, a)
    r = unwrap(emu, tmp_path, w["blob"], [a[0], secrets.token_hex(16)])
    cid = kms_requests(emu, "/actions/unwrap")[-1]["correlation_id"]
    expect_error(r, errno.EBADMSG, "key protect: unwrap of key '%s' failed: HTTP 400 INVALID_FIELD_ERR" % emu.kid,
                 "(correlation-id %s)" % cid)
    # Order matters too.
    r = unwrap(emu, tmp_path, w["blob"], a[::-1])
    expect_error(r, errno.EBADMSG, "HTTP 400 INVALID_FIELD_ERR")
    # A blob that is not base64 never leaves the client.
    n = len(emu.requests(kind="kms"))
    r = unwrap(emu, tmp_path, "not base64!", a)
    expect_error(r, errno.EBADMSG, "is not a key protect ciphertext")
    assert len(emu.requests(kind="kms")) == n


def test_foreign_ciphertext_is_ebadmsg(emu, tmp_path):
    a = aad()
    w = wrap(emu, tmp_path, a)
    other = emu.create_key("other")
    r = unwrap(emu, tmp_path, w["blob"], a, key=other)
    expect_error(r, errno.EBADMSG, "HTTP 422 UNPROCESSABLE_CIPHERTEXT_ERR")


def test_one_connection_is_reused(emu, tmp_path):
    r = probe(emu, tmp_path, "roundtrip", "20")
    assert r.ok, r
    # IAM and KMS share the emulator's address: 1 token request + 40 KMS calls, one TLS connection.
    assert len(emu.requests()) == 41
    assert emu.connections == 1


def test_many_calls_share_one_token_and_connections(emu, tmp_path):
    r = probe(emu, tmp_path, "roundtrip", "40", "8")
    assert r.ok, r
    assert r.doc["count"] == 40
    assert len(emu.token_requests()) == 1
    assert len(kms_requests(emu, "/actions/wrap")) == 40
    assert len(kms_requests(emu, "/actions/unwrap")) == 40
    # Handles go back to a pool and keep their connections: at most one per thread.
    assert emu.connections <= 8


def test_token_near_expiry_is_not_used(emu_factory, tmp_path):
    # expires_in 61: the token is fresh for 1 s (never used within 60 s of expiration).
    e = emu_factory(token_ttl=61)
    r = probe(e, tmp_path, "roundtrip", "2", "1", "1300")
    assert r.ok, r
    assert len(e.token_requests()) == 2


def test_key_state_values(emu, tmp_path):
    def state():
        r = probe(emu, tmp_path, "state")
        assert r.ok, r
        return r.doc["state"], r.doc["name"]

    assert state() == (1, "active")
    emu.key_action(emu.kid, "disable")
    assert state() == (2, "suspended")
    emu.key_action(emu.kid, "enable")
    assert state() == (1, "active")
    emu.set_state(emu.kid, 3)
    assert state() == (3, "deactivated")
    emu.set_state(emu.kid, 1)
    emu.key_action(emu.kid, "delete")
    assert state() == (5, "destroyed")
    emu.key_action(emu.kid, "restore")
    assert state() == (1, "active")
    emu.key_action(emu.kid, "delete")
    emu.key_action(emu.kid, "purge")
    assert state() == (404, "purged")
    md = kms_requests(emu, "/metadata")
    assert all(e["method"] == "GET" and "content-type" not in e["headers"] for e in md)
    assert [e["status"] for e in md] == [200] * 6 + [404]


def test_deleted_key_metadata_410_is_destroyed(emu_factory, tmp_path):
    e = emu_factory(deleted_metadata_status=410)
    e.key_action(e.kid, "delete")
    r = probe(e, tmp_path, "state")
    assert r.ok and r.doc["state"] == 5, r


def test_rotation_rewraps_on_unwrap(emu, tmp_path):
    a = aad()
    w = wrap(emu, tmp_path, a)
    v1 = emu.key(emu.kid).latest["id"]
    emu.key_action(emu.kid, "rotate")
    v2 = emu.key(emu.kid).latest["id"]
    assert v1 != v2
    u = unwrap(emu, tmp_path, w["blob"], a)
    assert u.ok, u
    assert u.doc["dek_sha256"] == w["dek_sha256"]
    assert u.doc["rewrapped"] is True
    assert u.doc["key_version"] == v2
    assert u.doc["blob"] != w["blob"] and len(u.doc["blob"]) <= 600
    # The re-wrapped blob unwraps to the same DEK with no further re-wrap.
    u2 = unwrap(emu, tmp_path, u.doc["blob"], a)
    assert u2.ok, u2
    assert u2.doc == {"ok": True, "op": "unwrap", "dek_sha256": w["dek_sha256"], "rewrapped": False}
    # New wraps use the new version.
    assert wrap(emu, tmp_path, a)["key_version"] == v2


def test_suspended_key_is_enokey(emu, tmp_path):
    a = aad()
    w = wrap(emu, tmp_path, a)
    emu.key_action(emu.kid, "disable")
    expect_error(probe(emu, tmp_path, "wrap", *a), errno.ENOKEY,
                 "key protect: wrap of key '%s' failed: HTTP 409 KEY_ACTION_INVALID_STATE_ERR: "
                 "the key is suspended or not active (correlation-id " % emu.kid)
    expect_error(unwrap(emu, tmp_path, w["blob"], a), errno.ENOKEY, "HTTP 409 KEY_ACTION_INVALID_STATE_ERR")
    emu.key_action(emu.kid, "enable")
    assert unwrap(emu, tmp_path, w["blob"], a).ok


def test_deactivated_key_unwraps_but_does_not_wrap(emu, tmp_path):
    a = aad()
    w = wrap(emu, tmp_path, a)
    emu.set_state(emu.kid, 3)
    expect_error(probe(emu, tmp_path, "wrap", *a), errno.EKEYEXPIRED, "HTTP 409 KEY_ACTION_INVALID_STATE_ERR",
                 "deactivated")
    # The state lookup that told deactivated from suspended kept the call's correlation id.
    wr = kms_requests(emu, "/actions/wrap")[-1]
    md = kms_requests(emu, "/metadata")[-1]
    assert md["correlation_id"] == wr["correlation_id"]
    u = unwrap(emu, tmp_path, w["blob"], a)
    assert u.ok and u.doc["dek_sha256"] == w["dek_sha256"], u


def test_deleted_key_is_ekeyrevoked(emu, tmp_path):
    a = aad()
    w = wrap(emu, tmp_path, a)
    emu.key_action(emu.kid, "delete")
    expect_error(unwrap(emu, tmp_path, w["blob"], a), errno.EKEYREVOKED, "HTTP 410 KEY_DELETED_ERR: the key is destroyed")
    expect_error(probe(emu, tmp_path, "wrap", *a), errno.EKEYREVOKED, "HTTP 410 KEY_DELETED_ERR")
    # Restored within the grace period: the data is back.
    emu.key_action(emu.kid, "restore")
    u = unwrap(emu, tmp_path, w["blob"], a)
    assert u.ok and u.doc["dek_sha256"] == w["dek_sha256"], u


def test_purged_key_is_404_everywhere(emu, tmp_path):
    a = aad()
    w = wrap(emu, tmp_path, a)
    emu.key_action(emu.kid, "delete")
    emu.key_action(emu.kid, "purge")
    expect_error(unwrap(emu, tmp_path, w["blob"], a), errno.EKEYREVOKED,
                 "HTTP 404 KEY_NOT_FOUND_ERR: key not found: purged, or never created")
    expect_error(probe(emu, tmp_path, "wrap", *a), errno.EKEYREVOKED, "HTTP 404 KEY_NOT_FOUND_ERR")
    r = probe(emu, tmp_path, "state")
    assert r.ok and r.doc["state"] == 404 and r.doc["name"] == "purged", r


def test_unknown_key(emu, tmp_path):
    kid = str(uuid.uuid4())
    expect_error(probe(emu, tmp_path, "wrap", *aad(), key=kid), errno.EKEYREVOKED,
                 "key protect: wrap of key '%s' failed: HTTP 404 KEY_NOT_FOUND_ERR" % kid)


def test_key_as_crn_gives_the_instance(emu, tmp_path):
    crn = emu.key(emu.kid).crn()
    a = aad()
    w = wrap(emu, tmp_path, a, key=crn, clear_instance=True)
    u = unwrap(emu, tmp_path, w["blob"], a, key=crn, clear_instance=True)
    assert u.ok and u.doc["dek_sha256"] == w["dek_sha256"], u
    for e in emu.requests(kind="kms"):
        assert e["headers"]["bluemix-instance"] == emu.instance
        assert e["path"].startswith("/api/v2/keys/%s/" % emu.kid)
    other = str(uuid.uuid4())
    r = probe(emu, tmp_path, "state", key=crn, instance=other)
    expect_error(r, errno.EINVAL, "instance '%s' is not the instance '%s' of the key CRN" % (other, emu.instance))
    r = probe(emu, tmp_path, "state", key="crn:v1:bluemix:public:cos:x:a/b:c:key:d")
    expect_error(r, errno.EINVAL, "is not a key CRN")


# ---- faults: success after a retry, or one clear error in bounded time ----

def test_5xx_once_then_success(emu, tmp_path):
    emu.add_fault("status", status=503, count=1)
    emu.add_fault("status", status=502, count=1, match="/actions/unwrap")
    a = aad()
    w = wrap(emu, tmp_path, a)
    assert unwrap(emu, tmp_path, w["blob"], a).ok
    for action in ("wrap", "unwrap"):
        reqs = kms_requests(emu, "/actions/" + action)
        assert [e["status"] for e in reqs] == [503 if action == "wrap" else 502, 200]
        # Retries keep the call's correlation id.
        assert reqs[0]["correlation_id"] == reqs[1]["correlation_id"]


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(emu, tmp_path, status):
    emu.add_fault("status", status=status, count=1, retry_after=1)
    r = probe(emu, tmp_path, "wrap", *aad())
    assert r.ok, r
    reqs = kms_requests(emu, "/actions/wrap")
    assert [e["status"] for e in reqs] == [status, 200]
    # Backoff alone would be 10 ms here: the second try waited for Retry-After.
    assert reqs[1]["t"] - reqs[0]["t"] >= 0.95


def test_retry_after_http_date(emu, tmp_path):
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 2))
    emu.add_fault("status", status=429, count=1, retry_after=when)
    r = probe(emu, tmp_path, "wrap", *aad())
    assert r.ok, r
    reqs = kms_requests(emu, "/actions/wrap")
    assert [e["status"] for e in reqs] == [429, 200]
    assert reqs[1]["t"] - reqs[0]["t"] >= 0.9


def test_dropped_connection_once_then_success(emu, tmp_path):
    emu.add_fault("drop", count=1)
    r = probe(emu, tmp_path, "wrap", *aad())
    assert r.ok, r
    assert [e["status"] for e in kms_requests(emu, "/actions/wrap")] == ["dropped", 200]


def test_iam_5xx_once_then_success(emu, tmp_path):
    emu.add_fault("status", status=500, count=1, match="iam")
    r = probe(emu, tmp_path, "state")
    assert r.ok, r
    assert [e["status"] for e in emu.token_requests()] == [500, 200]


def test_permanent_500_is_one_clear_error(emu, tmp_path):
    emu.add_fault("status", status=500, count=-1)
    r = probe(emu, tmp_path, "wrap", *aad())
    reqs = kms_requests(emu, "/actions/wrap")
    assert len(reqs) == 5          # the first try and 4 retries
    cid = reqs[0]["correlation_id"]
    assert all(e["correlation_id"] == cid for e in reqs)
    expect_error(r, errno.EIO, "key protect: wrap of key '%s' failed after 5 attempts: HTTP 500 INTERNAL_SERVER_ERR: "
                 "Internal Server Error: injected fault (INTERNAL_SERVER_ERR) (correlation-id %s)" % (emu.kid, cid))
    assert r.elapsed < 5


@pytest.mark.parametrize("status", [400, 501])
def test_no_retry_on_4xx_and_501(emu, tmp_path, status):
    emu.add_fault("status", status=status, count=-1)
    r = probe(emu, tmp_path, "wrap", *aad())
    assert len(kms_requests(emu, "/actions/wrap")) == 1
    expect_error(r, errno.EINVAL if status == 400 else errno.EIO, "failed: HTTP %d " % status)


def test_malformed_json_is_a_clear_error(emu, tmp_path):
    emu.add_fault("malformed", count=1)
    r = probe(emu, tmp_path, "wrap", *aad())
    expect_error(r, errno.EIO, "HTTP 200 with a malformed JSON body")
    assert len(kms_requests(emu, "/actions/wrap")) == 1


def test_oversized_answer_is_refused(emu, tmp_path):
    emu.add_fault("oversize", count=1, size=100 * 1024)
    r = probe(emu, tmp_path, "state")
    expect_error(r, errno.EIO, "response too large (over 65536 bytes)")
    # A body just under the cap is still read.
    emu.add_fault("oversize", count=1, size=60 * 1024)
    r = probe(emu, tmp_path, "state")
    expect_error(r, errno.EIO, "without a key state")


def test_timeout_is_etimedout(emu, tmp_path):
    emu.add_fault("latency", count=-1, ms=1500)
    r = probe(emu, tmp_path, "state", env={"KEYFS_TEST_TIMEOUT_MS": "200"})
    expect_error(r, errno.ETIMEDOUT, "failed after 5 attempts: no answer from '%s' in time" % emu.url)
    assert r.elapsed < 5


def test_unreachable_endpoint(emu, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()          # nothing listens there now
    url = "https://127.0.0.1:%d" % port
    r = probe(emu, tmp_path, "state", iam=url)
    expect_error(r, errno.EHOSTUNREACH, "failed after 5 attempts: cannot reach '%s/identity/token'" % url)
    assert r.elapsed < 5


def test_untrusted_certificate(emu, tmp_path):
    r = probe(emu, tmp_path, "wrap", *aad(), ca_file=None)
    expect_error(r, errno.EHOSTUNREACH, "TLS certificate of '%s/identity/token' is not trusted" % emu.url)
    # Not retried, and nothing reached the service.
    assert "after" not in r.doc["error"]
    assert emu.requests() == []


def test_wrong_api_key(emu, tmp_path):
    r = probe(emu, tmp_path, "wrap", *aad(), apikey="kpemu-wrong-" + secrets.token_hex(8))
    expect_error(r, errno.EACCES, "key protect: wrap of key '%s' failed: IAM '%s/identity/token' refused the API key: "
                 "HTTP 400 BXNIM0415E: Provided API key could not be found." % (emu.kid, emu.url))
    assert emu.requests(kind="kms") == []
    assert len(emu.token_requests()) == 1


def test_expired_token_is_refreshed_once(emu, tmp_path):
    # The second KMS request of the process meets a token the service no longer accepts.
    emu.add_fault("expire_tokens", count=1, skip=1)
    r = probe(emu, tmp_path, "roundtrip", "1")
    assert r.ok, r
    assert len(emu.token_requests()) == 2
    un = kms_requests(emu, "/actions/unwrap")
    assert [e["status"] for e in un] == [401, 200]
    assert un[0]["correlation_id"] == un[1]["correlation_id"]


def test_persistent_401_is_access_denied(emu, tmp_path):
    emu.add_fault("status", status=401, count=-1)
    r = probe(emu, tmp_path, "state")
    expect_error(r, errno.EACCES, "HTTP 401: access denied")
    assert len(emu.token_requests()) == 2      # one fresh token, once
    assert len(kms_requests(emu, "/metadata")) == 2


def test_403_is_access_denied(emu, tmp_path):
    r = probe(emu, tmp_path, "wrap", *aad(), apikey=READER_APIKEY)
    expect_error(r, errno.EACCES, "HTTP 403 FORBIDDEN_ERR: access denied")
    r = probe(emu, tmp_path, "state", apikey=READER_APIKEY)
    assert r.ok and r.doc["state"] == 1
    r = probe(emu, tmp_path, "state", apikey=NOACCESS_APIKEY)
    expect_error(r, errno.EACCES, "HTTP 403 FORBIDDEN_ERR")
    assert len(kms_requests(emu, "/metadata")) == 2   # 403 is not retried


# ---- configuration ----

def test_api_key_sources(emu, tmp_path):
    # Missing file: -EACCES and the path in the message.
    r = probe(emu, tmp_path, "state", apikey=None, apikey_file=str(tmp_path / "nope"))
    expect_error(r, errno.EACCES, "API key file '%s': No such file or directory" % (tmp_path / "nope"))
    # Neither apikey_file nor $CREDENTIALS_DIRECTORY.
    r = probe(emu, tmp_path, "state", apikey=None)
    expect_error(r, errno.EACCES, "no API key")
    # systemd credentials, whitespace around the key trimmed.
    cred = tmp_path / "creds"
    cred.mkdir()
    (cred / "apikey").write_text("\n  %s \n\n" % APIKEY)
    os.chmod(cred / "apikey", 0o400)
    r = probe(emu, tmp_path, "state", apikey=None, env={"CREDENTIALS_DIRECTORY": str(cred)})
    assert r.ok, r
    # Readable by others: works, with one warning.
    f = tmp_path / "open-apikey"
    f.write_text(APIKEY)
    os.chmod(f, 0o644)
    r = probe(emu, tmp_path, "state", apikey=None, apikey_file=str(f))
    assert r.ok, r
    assert r.stderr == "kms-probe: warning: API key file '%s' is readable by group or others: chmod 600 it\n" % f
    # Empty, two words, too big.
    for content, msg in (("\n", "is empty"), ("a b", "more than one word"), ("x" * 5000, "larger than 4096 bytes")):
        f.write_text(content)
        os.chmod(f, 0o600)
        r = probe(emu, tmp_path, "state", apikey=None, apikey_file=str(f))
        expect_error(r, errno.EINVAL, msg)
    # Only the two runs that had a key talked to the service.
    assert [(e["kind"], e["status"]) for e in emu.requests()] == [("iam", 200), ("kms", 200)] * 2


def test_bad_urls_and_ca_file(emu, tmp_path):
    r = probe(emu, tmp_path, "state", iam="http://127.0.0.1:1")
    expect_error(r, errno.EINVAL, "IAM endpoint 'http://127.0.0.1:1' is not an https:// URL")
    r = probe(emu, tmp_path, "state", ca_file=str(tmp_path / "no-ca.pem"))
    expect_error(r, errno.EACCES, "CA file '%s'" % (tmp_path / "no-ca.pem"))
    r = probe(emu, tmp_path, "state", key="../../etc")
    expect_error(r, errno.EINVAL, "is neither a key id, an alias nor a key CRN")
    assert emu.requests() == []


# ---- the emulator itself: wire details the client does not exercise ----

class Api:
    """A minimal raw client of the emulator, trusting its CA."""

    def __init__(self, emu, apikey=APIKEY):
        self.emu = emu
        self.ctx = ssl.create_default_context(cafile=emu.ca_file)
        self.token = None
        if apikey:
            st, doc, _ = self.call("POST", "/identity/token", raw=urllib.parse.urlencode(
                {"grant_type": "urn:ibm:params:oauth:grant-type:apikey", "apikey": apikey}).encode(),
                ctype="application/x-www-form-urlencoded", auth=False)
            assert st == 200, doc
            self.token = doc["access_token"]

    def call(self, method, path, body=None, raw=None, ctype=None, auth=True, instance=True, headers=None):
        c = http.client.HTTPSConnection("127.0.0.1", self.emu.port, context=self.ctx, timeout=10)
        h = {"accept": "application/json"}
        if auth and self.token:
            h["authorization"] = "Bearer " + self.token
        if instance:
            h["bluemix-instance"] = self.emu.instance
        if body is not None:
            raw = json.dumps(body).encode()
        if ctype:
            h["content-type"] = ctype
        h.update(headers or {})
        c.request(method, path, body=raw, headers=h)
        resp = c.getresponse()
        data = resp.read()
        c.close()
        return resp.status, (json.loads(data) if data else None), resp


def test_emulator_error_bodies_and_auth(emu):
    api = Api(emu)
    # 401 carries errorMsg only.
    st, doc, _ = Api(emu, apikey=None).call("GET", "/api/v2/keys/%s/metadata" % emu.kid)
    assert st == 401
    assert doc == {"metadata": {"collectionType": "application/vnd.ibm.kms.error+json", "collectionTotal": 1},
                   "resources": [{"errorMsg": "Unauthorized: The user does not have access to the specified resource"}]}
    # Missing bluemix-instance.
    st, doc, _ = api.call("GET", "/api/v2/keys/%s/metadata" % emu.kid, instance=False)
    assert st == 400 and doc["resources"][0]["reasons"][0]["target"] == {"type": "header", "name": "bluemix-instance"}
    # 409 with reasons, and the correlation id echoed.
    emu.key_action(emu.kid, "disable")
    st, doc, resp = api.call("POST", "/api/v2/keys/%s/actions/wrap" % emu.kid,
                             body={"plaintext": base64.b64encode(b"k" * 32).decode()},
                             headers={"correlation-id": "c0ffee"})
    assert st == 409 and resp.getheader("correlation-id") == "c0ffee"
    assert doc["metadata"] == {"collectionType": "application/vnd.ibm.kms.error+json", "collectionTotal": 1}
    reason, = doc["resources"][0]["reasons"]
    assert reason == {"code": "KEY_ACTION_INVALID_STATE_ERR", "message": "Key is not in a valid state for this action",
                      "status": 409, "moreInfo": "https://cloud.ibm.com/apidocs/key-protect"}
    assert doc["resources"][0]["errorMsg"].endswith("(KEY_ACTION_INVALID_STATE_ERR)")
    # IAM errors have their own shape.
    st, doc, _ = api.call("POST", "/identity/token", raw=b"grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey=x",
                          ctype="application/x-www-form-urlencoded", auth=False)
    assert st == 400 and doc["errorCode"] == "BXNIM0415E" and "context" in doc


def test_emulator_key_lifecycle(emu_factory):
    e = emu_factory(enforce_too_early=True, too_early_seconds=30, enforce_rotation_limit=True)
    api = Api(e)
    st, doc, _ = api.call("POST", "/api/v2/keys", body={
        "metadata": {"collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": 1},
        "resources": [{"type": "application/vnd.ibm.kms.key+json", "name": "root2", "extractable": False}]})
    assert st == 201 and doc["metadata"]["collectionTotal"] == 1
    key = doc["resources"][0]
    kid = key["id"]
    assert key["state"] == 1 and key["extractable"] is False and key["crn"].endswith(":key:" + kid)
    # Wrap without plaintext generates a 32-byte DEK; the deprecated ?action= form works.
    st, w, _ = api.call("POST", "/api/v2/keys/%s?action=wrap" % kid, body={"aad": ["a"]})
    assert st == 200 and len(base64.b64decode(w["plaintext"])) == 32
    st, u, _ = api.call("POST", "/api/v2/keys/%s/actions/unwrap" % kid, body={"ciphertext": w["ciphertext"], "aad": ["a"]},
                        ctype=ACTION_TYPE)
    assert st == 200 and u["plaintext"] == w["plaintext"] and "rewrappedKeyVersion" not in u
    # Rotate: 204, then once an hour only; rewrap gives the new version.
    st, _, _ = api.call("POST", "/api/v2/keys/%s/actions/rotate" % kid)
    assert st == 204
    st, doc, _ = api.call("POST", "/api/v2/keys/%s/actions/rotate" % kid)
    assert st == 409 and doc["resources"][0]["reasons"][0]["code"] == "KEY_ROTATION_NOT_PERMITTED"
    st, rw, _ = api.call("POST", "/api/v2/keys/%s/actions/rewrap" % kid, body={"ciphertext": w["ciphertext"], "aad": ["a"]})
    assert st == 200 and "plaintext" not in rw
    assert rw["rewrappedKeyVersion"]["id"] == e.key(kid).latest["id"] != w["keyVersion"]["id"]
    # Disable, then enable too early.
    assert api.call("POST", "/api/v2/keys/%s/actions/disable" % kid)[0] == 204
    st, doc, _ = api.call("POST", "/api/v2/keys/%s/actions/enable" % kid)
    assert st == 409 and doc["resources"][0]["reasons"][0]["code"] == "REQ_TOO_EARLY_ERR"
    e.key(kid).last_action -= 31
    assert api.call("POST", "/api/v2/keys/%s/actions/enable" % kid)[0] == 204
    # Delete: representation or minimal.
    st, doc, _ = api.call("DELETE", "/api/v2/keys/%s?force=true" % kid, headers={"prefer": "return=representation"})
    assert st == 200 and doc["resources"][0]["state"] == 5 and doc["resources"][0]["deleted"] is True
    st, doc, _ = api.call("POST", "/api/v2/keys/%s/actions/unwrap" % kid, body={"ciphertext": w["ciphertext"], "aad": ["a"]})
    assert st == 410 and doc["resources"][0]["reasons"][0]["code"] == "KEY_DELETED_ERR"
    e.key(kid).last_action -= 31
    assert api.call("POST", "/api/v2/keys/%s/restore" % kid)[0] == 201
    st, doc, _ = api.call("DELETE", "/api/v2/keys/%s" % kid, headers={"prefer": "return=minimal"})
    assert st == 204 and doc is None
    # Purge: 404 everywhere afterwards.
    assert api.call("DELETE", "/api/v2/keys/%s/purge" % kid)[0] == 200
    for method, path in (("GET", ""), ("GET", "/metadata"), ("POST", "/actions/unwrap"), ("POST", "/restore")):
        st, doc, _ = api.call(method, "/api/v2/keys/%s%s" % (kid, path),
                              body={"ciphertext": w["ciphertext"]} if method == "POST" else None)
        assert st == 404 and doc["resources"][0]["reasons"][0]["code"] == "KEY_NOT_FOUND_ERR", (path, doc)


def test_emulator_control_api(emu):
    api = Api(emu, apikey=None)
    st, faults, _ = api.call("POST", "/_emu/faults", body={"kind": "status", "status": 503, "count": 2, "retry_after": 1},
                             instance=False)
    assert st == 200 and faults[0]["kind"] == "status" and faults[0]["count"] == 2
    st, _, resp = Api(emu).call("GET", "/api/v2/keys/%s/metadata" % emu.kid)
    assert st == 503 and resp.getheader("retry-after") == "1"
    assert api.call("DELETE", "/_emu/faults")[0] == 204
    st, log, _ = api.call("GET", "/_emu/log")
    assert st == 200 and [x["kind"] for x in log] == ["iam", "kms"]
    assert all("authorization" not in x["headers"] for x in log)
    st, key, _ = api.call("POST", "/_emu/keys/%s/disable" % emu.kid)
    assert st == 200 and key["state"] == 2
    assert api.call("POST", "/_emu/faults", body={"kind": "nonsense"})[0] == 400


def test_emulator_standalone_process(certs, tmp_path):
    """python3 -m tests.kpemu prints what a volume needs, serves until SIGTERM, keeps keys in --state-file."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    keyfile = tmp_path / "apikey"
    keyfile.write_text(APIKEY + "\n")
    state = tmp_path / "state.json"

    class Info:
        issued_tokens = []

    def run(extra, want):
        argv = ["/usr/bin/python3", "-m", "tests.kpemu", "--apikey-file", str(keyfile), "--certdir", certs.dir,
                "--state-file", str(state), *extra]
        p = subprocess.Popen(argv, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        info = {}
        while not want <= set(info):
            line = p.stdout.readline()
            if not line:
                p.wait(timeout=10)
                pytest.fail("emulator exited with %s: %s" % (p.returncode, p.stderr.read()))
            k, _, v = line.strip().partition("=")
            info[k] = v
        Info.url = info["endpoint"]
        Info.instance = info["instance"]
        Info.ca_file = info["ca_file"]
        return p, info

    p, info = run(["--create-key", "root"], {"endpoint", "iam_endpoint", "ca_file", "instance", "key", "crn"})
    try:
        assert info["ca_file"] == certs.ca_file and info["endpoint"].startswith("https://127.0.0.1:")
        assert info["iam_endpoint"] == info["endpoint"]
        assert info["crn"].endswith(":%s:key:%s" % (info["instance"], info["key"]))
        Info.kid = info["key"]
        r = probe(Info, tmp_path, "roundtrip", "3")
        assert r.ok, r
        a = aad()
        w = wrap(Info, tmp_path, a)
    finally:
        p.terminate()
        p.wait(timeout=10)
    assert p.returncode == 0
    # A restart (another port) keeps the instance, the key and its versions.
    p, info2 = run([], {"endpoint", "instance"})
    try:
        assert info2["instance"] == info["instance"]
        u = unwrap(Info, tmp_path, w["blob"], a)
        assert u.ok and u.doc["dek_sha256"] == w["dek_sha256"], u
    finally:
        p.terminate()
        p.wait(timeout=10)
    assert p.returncode == 0
