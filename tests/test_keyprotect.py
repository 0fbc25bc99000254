# test_keyprotect.py: keyfsctl init --kms keyprotect and real keyfs mounts against the Key Protect emulator
#
# The emulator (tests/kpemu) runs inside pytest; keyfsctl and the keyfs daemon talk to it over
# HTTPS with a CA made at test time. Every test also checks, at its end, that no keyfsctl output
# and no daemon log holds the API key or any token the emulator issued.
import errno
import json
import os
import re
import secrets
import socket
import stat
import subprocess
import time
import uuid

import pytest

from helpers import (APIKEY, EXIT_KMS, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, FUSERMOUNT, KEYFS, KEYFSCTL, is_mounted, read_file,
                     wait_for, write_file, NOACCESS_APIKEY, READER_APIKEY, UNKNOWN_APIKEY)
from kpemu import make_certs

ALL_APIKEYS = (APIKEY, READER_APIKEY, NOACCESS_APIKEY, UNKNOWN_APIKEY)
# Test-only knob of the Key Protect client: retry backoff 10, 20, 40, 80 ms instead of 1..8 s.
BACKOFF_SCALE = "0.01"
CID = r"\(correlation-id ([0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})\)"
SIZES = [1, 4095, 4096, 4097, 65536 + 13, (1 << 20) + 1]


class Secrets:
    """Where the API key files live (0700 dir, 0600 files), kept out of the leak scan."""

    def __init__(self, tmp_path):
        self.dir = tmp_path / "secrets"
        self.dir.mkdir(mode=0o700)

    def file(self, apikey, name=None):
        p = self.dir / (name or ("apikey-" + secrets.token_hex(4)))
        fd = os.open(str(p), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(apikey + "\n")
        return str(p)


OUTPUTS = []        # text keyfsctl and directly started daemons printed in the current test


@pytest.fixture(autouse=True)
def kp_env(monkeypatch, emu, tmp_path):
    """Fast retries, no proxy, no inherited credentials; afterwards: no secret in any output."""
    monkeypatch.setenv("KEYFS_TEST_BACKOFF_SCALE", BACKOFF_SCALE)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    OUTPUTS.clear()
    yield Secrets(tmp_path)
    # The mount fixture has unmounted by now (it was set up after this one): logs are complete.
    texts = list(OUTPUTS)
    for root, dirs, files in os.walk(str(tmp_path)):
        dirs[:] = [d for d in dirs if d != "secrets" and not is_mounted(os.path.join(root, d))]
        for n in files:
            p = os.path.join(root, n)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    texts.append(f.read().decode("latin-1"))
    leaks = list(ALL_APIKEYS) + list(emu.issued_tokens)
    for text in texts:
        for s in leaks:
            assert s not in text, "a secret leaked into output or a file: %r" % text[:2000]
        assert "Bearer" not in text


def run(argv, env=None, timeout=60):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout, env=e)
    OUTPUTS.append(p.stdout + p.stderr)
    return p


def ctl(*args, env=None):
    return run([KEYFSCTL, *args], env=env)


def kp_init(emu, backing, apikey_file=None, key=None, instance=True, ca=True, endpoint=None, iam=None,
            env=None, extra=()):
    argv = ["init", str(backing), "--kms", "keyprotect", "--endpoint", endpoint or emu.url,
            "--iam-endpoint", iam or emu.url, "--key", key or emu.kid]
    if instance:
        argv += ["--instance", emu.instance if instance is True else instance]
    if apikey_file:
        argv += ["--apikey-file", apikey_file]
    if ca:
        argv += ["--ca-file", emu.ca_file if ca is True else ca]
    return ctl(*argv, *extra, env=env)


def make_volume(emu, tmp_path, sec, name="backing", **kw):
    apikey_file = sec.file(APIKEY)
    backing = str(tmp_path / name)
    r = kp_init(emu, backing, apikey_file, **kw)
    assert r.returncode == EXIT_OK, r
    return backing, apikey_file


def kp_mount(mount, emu, backing, apikey_file=None, allow_errors=False, extra_args=()):
    """Mount as a user would: no -o ca_file=, the mount trusts the CA file recorded at init."""
    opts = ["apikey_file=" + apikey_file] if apikey_file else []
    return mount(backing=backing, opts=opts, allow_errors=allow_errors, extra_args=extra_args)


def inspect(*paths):
    r = ctl("inspect", "--json", *paths)
    assert r.returncode == EXIT_OK, r
    doc = json.loads(r.stdout)
    assert len(doc) == len(paths)
    return doc


def voldesc(backing):
    out = {}
    with open(os.path.join(backing, ".keyfs")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                k, _, v = line.rstrip("\n").partition("=")
                out[k] = v
    return out


def unwraps(emu):
    return emu.requests(kind="kms", path="/actions/unwrap")


def payload(i, size):
    return (b"file %d: " % i + secrets.token_bytes(64)) * (size // 73 + 1)


# ---- init and a round trip ----

def test_init_mount_round_trip(emu, tmp_path, kp_env, mount):
    apikey_file = kp_env.file(APIKEY)
    backing = str(tmp_path / "data")
    r = kp_init(emu, backing, apikey_file)
    assert r.returncode == EXIT_OK, r
    assert r.stderr == ""
    version = emu.key(emu.kid).latest["id"]
    assert r.stdout.splitlines()[0] == "created keyfs volume '%s'" % backing
    for line in ("  kms:      keyprotect", "  key:      %s" % emu.kid, "  version:  %s" % version,
                 "  endpoint: %s" % emu.url, "  instance: %s" % emu.instance, "  iam:      %s" % emu.url):
        assert line in r.stdout.splitlines(), r.stdout
    assert r.stdout.splitlines()[-1] == "mount it with: keyfs %s MOUNTPOINT -o apikey_file=%s" % (backing, apikey_file)
    vol = voldesc(backing)
    assert vol["kms"] == "keyprotect" and vol["key"] == emu.kid and vol["key_id"] == emu.kid
    assert vol["endpoint"] == emu.url and vol["iam_endpoint"] == emu.url and vol["instance"] == emu.instance
    assert vol["ca_file"] == emu.ca_file
    assert stat.S_IMODE(os.stat(os.path.join(backing, ".keyfs")).st_mode) == 0o644
    assert sorted(os.listdir(backing)) == [".keyfs"]
    # init resolved the key and proved it: one identity read, one state read, one wrap, one unwrap, all 200.
    kms = emu.requests(kind="kms")
    assert [(e["method"], e["path"].rsplit("/", 1)[-1], e["status"]) for e in kms] == [
        ("GET", "metadata", 200), ("GET", "metadata", 200), ("POST", "wrap", 200), ("POST", "unwrap", 200)]

    m = kp_mount(mount, emu, backing, apikey_file)
    data = {"empty": b""}
    for i, size in enumerate(SIZES):
        data["f%d" % i] = payload(i, size)[:size]
    os.mkdir(m.path("sub"))
    data["sub/nested"] = b"nested\n"
    for name, d in data.items():
        write_file(m.path(name), d)
    for name, d in data.items():
        assert read_file(m.path(name)) == d
    # Headers carry the key id and the version the service wrapped with (an empty file created
    # through the mount has its header too).
    for doc in inspect(*[m.bpath(n) for n in data]):
        assert doc["key"] == emu.kid and doc["key_version"] == version, doc
    m.umount()

    emu.clear_log()
    m.start()
    for name, d in data.items():
        assert read_file(m.path(name)) == d
    assert len(unwraps(emu)) == len(data)           # one per file, also for the empty one
    assert all(e["status"] == 200 for e in unwraps(emu))


def test_init_with_crn_takes_the_instance_from_it(emu, tmp_path, kp_env, mount):
    crn = emu.key(emu.kid).crn()
    apikey_file = kp_env.file(APIKEY)
    backing = str(tmp_path / "data")
    # A CRN naming another instance than --instance is refused before anything is asked or written.
    r = kp_init(emu, backing, apikey_file, key=crn, instance=str(uuid.uuid4()))
    assert r.returncode == EXIT_USAGE, r
    assert "is not the instance '%s' named in the key CRN" % emu.instance in r.stderr
    assert not os.path.exists(backing) and emu.requests() == []

    r = kp_init(emu, backing, apikey_file, key=crn, instance=False)
    assert r.returncode == EXIT_OK, r
    vol = voldesc(backing)
    assert vol["key"] == crn and vol["key_id"] == emu.kid and vol["instance"] == emu.instance
    assert "  key:      %s (id %s)" % (crn, emu.kid) in r.stdout.splitlines()
    m = kp_mount(mount, emu, backing, apikey_file)
    write_file(m.path("a"), b"via crn")
    assert read_file(m.path("a")) == b"via crn"
    assert inspect(m.bpath("a"))[0]["key"] == emu.kid
    assert all(e["headers"]["bluemix-instance"] == emu.instance for e in emu.requests(kind="kms"))


# ---- rotation ----

def test_rotation_rewraps_each_header_on_first_open(emu, tmp_path, kp_env, mount):
    backing, apikey_file = make_volume(emu, tmp_path, kp_env)
    v1 = emu.key(emu.kid).latest["id"]
    m = kp_mount(mount, emu, backing, apikey_file)
    data = {"r%d" % i: payload(i, size)[:size] for i, size in enumerate([1, 4096, 10000, 70000, 3, 200000])}
    for name, d in data.items():
        write_file(m.path(name), d)
    paths = [m.bpath(n) for n in data]
    assert {d["key_version"] for d in inspect(*paths)} == {v1}
    m.umount()

    emu.key_action(emu.kid, "rotate")
    v2 = emu.key(emu.kid).latest["id"]
    assert v2 != v1
    for mount_no in (1, 2):
        emu.clear_log()
        m.start()
        if mount_no == 2:
            # A listing may unwrap keys ahead; still one unwrap per file.
            assert sorted(os.listdir(m.mnt)) == sorted(data)
        for name, d in data.items():
            assert read_file(m.path(name)) == d, "%s after rotation, mount %d" % (name, mount_no)
        # No more than one unwrap per file per mount (and each file needed one).
        assert len(unwraps(emu)) == len(data), [e["path"] for e in unwraps(emu)]
        docs = inspect(*paths)
        assert [d["key_version"] for d in docs] == [v2] * len(data), "mount %d" % mount_no
        assert {d["key"] for d in docs} == {emu.kid}
        m.umount()
    # New files are wrapped with the new version too, and the old ones still read after all that.
    m.start()
    write_file(m.path("new"), b"after rotation")
    assert inspect(m.bpath("new"))[0]["key_version"] == v2
    for name, d in data.items():
        assert read_file(m.path(name)) == d


# ---- faults ----

FAULTS = {
    "5xx-once": dict(kind="status", status=503, count=1),
    "429-retry-after": dict(kind="status", status=429, retry_after="1", count=1),
    "dropped-connection": dict(kind="drop", count=1),
    "latency-200ms": dict(kind="latency", ms=200, count=-1),
}


def faulted_then_ok(emu, action):
    """Every request the fault hit was retried under the same correlation id until it got a 200
    (a background refill of pre-wrapped keys may still be retrying: wait for it, bounded)."""
    def settled():
        reqs = emu.requests(kind="kms", path="/actions/" + action)
        hit = [e for e in reqs if e["fault"]]
        return all(any(x["correlation_id"] == e["correlation_id"] and x["status"] == 200 for x in reqs)
                   for e in hit) and (reqs, hit)
    reqs, hit = wait_for(settled, timeout=10, what="the faulted %s calls to succeed" % action)
    assert hit, "no %s request met the fault" % action
    for e in hit:
        same = [x for x in reqs if x["correlation_id"] == e["correlation_id"]]
        assert same[-1]["status"] == 200, same
        if e["status"] == 429:
            # Retry-After: 1 was honoured.
            assert same[same.index(e) + 1]["t"] - e["t"] >= 0.95, same
    return hit


@pytest.mark.parametrize("name", list(FAULTS))
def test_transient_fault_on_create_and_first_open_ends_in_success(emu, tmp_path, kp_env, mount, name):
    fault = FAULTS[name]
    backing, apikey_file = make_volume(emu, tmp_path, kp_env)
    m = kp_mount(mount, emu, backing, apikey_file)
    data = {}

    def create_until_hit(f, limit=20):
        for i in range(limit):
            n = "c%d" % len(data)
            data[n] = payload(len(data), 5000 + i)[:5000 + i]
            write_file(m.path(n), data[n])
            if f.hits:
                return
        pytest.fail("%d files created and the fault was never hit" % limit)

    f = emu.add_fault(match="/actions/wrap", **fault)
    create_until_hit(f)
    if fault["count"] == -1:
        create_until_hit(f)                     # a second creation under latency
    emu.clear_faults()
    faulted_then_ok(emu, "wrap")
    for n, d in data.items():
        assert read_file(m.path(n)) == d
    m.umount()

    m.start()
    emu.clear_log()
    f = emu.add_fault(match="/actions/unwrap", **fault)
    opened = []
    for n, d in data.items():
        t0 = time.monotonic()
        assert read_file(m.path(n)) == d, n
        opened.append((n, time.monotonic() - t0))
        if f.hits and fault["count"] != -1:
            break
    emu.clear_faults()
    hit = faulted_then_ok(emu, "unwrap")
    if fault["kind"] == "latency":
        assert all(t >= 0.2 for _, t in opened), opened
        assert len(hit) == len(data)
    for n, d in data.items():
        assert read_file(m.path(n)) == d
    assert m.proc.poll() is None


def test_permanent_500_is_eio_in_bounded_time_and_the_mount_survives(emu, tmp_path, kp_env, mount):
    backing, apikey_file = make_volume(emu, tmp_path, kp_env)
    m = kp_mount(mount, emu, backing, apikey_file, allow_errors=True)
    data = {"p%d" % i: payload(i, size)[:size] for i, size in enumerate([10, 5000, 100000])}
    for n, d in data.items():
        write_file(m.path(n), d)
    m.umount()
    m.start()                                   # no key cached: the first open needs the KMS

    emu.add_fault("status", status=500, count=-1, match="kms")
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        read_file(m.path("p1"))
    took = time.monotonic() - t0
    assert ei.value.errno == errno.EIO, ei.value
    assert took < 5, "EIO after %.1f s" % took
    failed_unwraps = [e for e in unwraps(emu) if e["status"] == 500]
    assert len(failed_unwraps) == 5                # the first try and 4 retries, then it gives up
    assert len({e["correlation_id"] for e in failed_unwraps}) == 1

    # Creating files: a pool of pre-wrapped keys may serve a few; then EIO, and nothing is left behind.
    created = {}
    for i in range(200):
        n = "new%d" % i
        t0 = time.monotonic()
        try:
            write_file(m.path(n), b"new %d" % i)
        except OSError as e:
            assert e.errno == errno.EIO, e
            assert time.monotonic() - t0 < 5
            assert not os.path.lexists(m.path(n)) and not os.path.lexists(m.bpath(n))
            break
        created[n] = b"new %d" % i
    else:
        pytest.fail("200 files created while every KMS request failed with HTTP 500")

    log = m.stderr()
    cids = {e["correlation_id"] for e in emu.requests(kind="kms") if e["status"] == 500}
    lines = [ln for ln in log.splitlines() if "HTTP 500" in ln]
    assert lines, log
    for ln in lines:
        mm = re.search(CID, ln)
        assert mm and mm.group(1) in cids, ln
    assert any("unwrap of key '%s' failed after 5 attempts: HTTP 500" % emu.kid in ln for ln in lines), log

    # The daemon is alive and the mount usable again once the service is.
    assert m.proc.poll() is None and is_mounted(m.mnt)
    emu.clear_faults()
    data.update(created)
    for n, d in data.items():
        assert read_file(m.path(n)) == d, n
    write_file(m.path("after"), b"after the outage")
    data["after"] = b"after the outage"
    m.umount()
    m.start()
    assert sorted(os.listdir(m.mnt)) == sorted(data)
    for n, d in data.items():
        assert read_file(m.path(n)) == d, n


# ---- init failures: exit code, message, nothing written ----

def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cid_of(emu, **kw):
    reqs = emu.requests(**kw)
    assert reqs, kw
    return reqs[-1]["correlation_id"]


INIT_FAILURES = ["wrong-apikey", "unknown-key", "suspended-key", "destroyed-key", "no-access", "reader-role",
                 "unreachable-endpoint", "untrusted-certificate"]


@pytest.mark.parametrize("case", INIT_FAILURES)
@pytest.mark.parametrize("backing_exists", [False, True], ids=["missing", "empty-dir"])
def test_init_failure_writes_nothing(emu, tmp_path, kp_env, case, backing_exists):
    backing = str(tmp_path / "data")
    if backing_exists:
        os.mkdir(backing)
    where = "%s (instance %s)" % (emu.url, emu.instance)
    kw = {}
    apikey = APIKEY
    if case == "wrong-apikey":
        apikey = UNKNOWN_APIKEY
    elif case == "unknown-key":
        kw["key"] = str(uuid.uuid4())
    elif case == "suspended-key":
        emu.key_action(emu.kid, "disable")
    elif case == "destroyed-key":
        emu.key_action(emu.kid, "delete")
    elif case == "no-access":
        apikey = NOACCESS_APIKEY
    elif case == "reader-role":
        apikey = READER_APIKEY
    elif case == "unreachable-endpoint":
        port = closed_port()
        kw["endpoint"] = "https://127.0.0.1:%d" % port
        where = "https://127.0.0.1:%d (instance %s)" % (port, emu.instance)
    elif case == "untrusted-certificate":
        kw["ca"] = False
    t0 = time.monotonic()
    r = kp_init(emu, backing, kp_env.file(apikey), **kw)
    assert time.monotonic() - t0 < 10
    err = r.stderr
    assert r.stdout == ""
    assert len(err.splitlines()) == 1 and err.startswith("keyfsctl: error: "), err
    key = kw.get("key", emu.kid)

    if case == "wrong-apikey":
        assert r.returncode == EXIT_KMS
        assert ("access to key '%s' at %s was denied: check the API key" % (key, where)) in err
        assert "refused the API key: HTTP 400 BXNIM0415E" in err
        assert "(correlation-id %s)" % cid_of(emu, kind="iam") in err
    elif case == "unknown-key":
        assert r.returncode == EXIT_KMS
        assert err.startswith("keyfsctl: error: key '%s' not found at %s: " % (key, where)), err
        assert "HTTP 404 KEY_NOT_FOUND_ERR" in err
        # Resolving the key's identity is the first call, and the one that finds no key.
        assert "(correlation-id %s)" % cid_of(emu, kind="kms", path="/metadata") in err
        assert emu.requests(kind="kms", path="/actions/") == []
    elif case == "suspended-key":
        assert r.returncode == EXIT_LOCKED
        assert err.startswith("keyfsctl: error: key '%s' at %s is suspended: enable it" % (key, where)), err
        assert "HTTP 409 KEY_ACTION_INVALID_STATE_ERR" in err
        assert "(correlation-id %s)" % cid_of(emu, kind="kms", path="/actions/wrap") in err
    elif case == "destroyed-key":
        assert r.returncode == EXIT_LOCKED
        assert err.startswith("keyfsctl: error: key '%s' at %s is destroyed: use another key" % (key, where)), err
        assert "HTTP 410 KEY_DELETED_ERR" in err
        assert "(correlation-id %s)" % cid_of(emu, kind="kms", path="/actions/wrap") in err
    elif case == "no-access":
        assert r.returncode == EXIT_KMS
        assert ("access to key '%s' at %s was denied: check the API key, and that its service ID has a Key Protect "
                "service role that allows wrap and unwrap (ReaderPlus or above)" % (key, where)) in err
        assert "HTTP 403" in err
        assert "(correlation-id %s)" % cid_of(emu, kind="kms", path="/metadata") in err
    elif case == "reader-role":
        # The key state is readable with Reader; the test wrap is what is refused.
        assert r.returncode == EXIT_KMS
        assert ("test wrap with key '%s' at %s was denied: check the API key, and that its service ID has a "
                "Key Protect service role that allows wrap and unwrap" % (key, where)) in err
        assert "HTTP 403" in err
        assert "(correlation-id %s)" % cid_of(emu, kind="kms", path="/actions/wrap") in err
    elif case == "unreachable-endpoint":
        assert r.returncode == EXIT_KMS
        assert err.startswith("keyfsctl: error: key service at %s cannot be used: " % where), err
        assert "failed after 5 attempts: cannot reach '%s'" % kw["endpoint"] in err
        assert re.search(CID, err)
    elif case == "untrusted-certificate":
        assert r.returncode == EXIT_KMS
        assert err.startswith("keyfsctl: error: key service at %s cannot be used: " % where), err
        assert "TLS certificate of '%s/identity/token' is not trusted" % emu.url in err
        assert "give the CA file" in err
        assert re.search(CID, err)
        assert emu.requests() == []             # nothing was sent to a server we do not trust
    if backing_exists:
        assert os.listdir(backing) == []
    else:
        assert not os.path.lexists(backing)


def test_init_usage_and_config_errors_write_nothing(emu, tmp_path, kp_env):
    apikey_file = kp_env.file(APIKEY)
    backing = str(tmp_path / "data")
    base = ["init", backing, "--kms", "keyprotect", "--iam-endpoint", emu.url, "--ca-file", emu.ca_file]
    cases = [
        (["--endpoint", emu.url.replace("https:", "http:"), "--instance", emu.instance, "--key", emu.kid,
          "--apikey-file", apikey_file], EXIT_USAGE, "is not an https:// URL"),
        (["--endpoint", emu.url, "--key", emu.kid, "--apikey-file", apikey_file], EXIT_USAGE,
         "missing --instance GUID (or give the key as a CRN"),
        (["--instance", emu.instance, "--key", emu.kid, "--apikey-file", apikey_file], EXIT_USAGE,
         "missing --endpoint URL"),
        (["--endpoint", emu.url, "--instance", emu.instance, "--apikey-file", apikey_file], EXIT_USAGE,
         "missing --key ID|CRN"),
        (["--endpoint", emu.url, "--key", "crn:v1:bluemix:public:kms:x", "--apikey-file", apikey_file],
         EXIT_USAGE, "is not a key CRN"),
        (["--endpoint", emu.url, "--instance", emu.instance, "--key", emu.kid], EXIT_KMS,
         "no API key: give --apikey-file FILE"),
        (["--endpoint", emu.url, "--instance", emu.instance, "--key", emu.kid, "--apikey-file",
          str(tmp_path / "nonexistent")], EXIT_KMS, "API key file '%s': No such file or directory"
         % (tmp_path / "nonexistent")),
    ]
    for extra, code, words in cases:
        r = ctl(*base, *extra)
        assert r.returncode == code, (extra, r)
        assert words in r.stderr, (extra, r.stderr)
        assert r.stderr.startswith("keyfsctl: error: ")
    r = ctl("init", backing, "--kms", "local", "--apikey-file", apikey_file)
    assert r.returncode == EXIT_USAGE and "--apikey-file works only with --kms keyprotect" in r.stderr
    r = kp_init(emu, backing, apikey_file, ca=str(tmp_path / "no-ca.pem"))
    assert r.returncode == EXIT_KMS and "CA file '%s'" % (tmp_path / "no-ca.pem") in r.stderr
    assert not os.path.lexists(backing)
    assert emu.requests() == []


# ---- credentials ----

def test_mount_with_credentials_directory(emu, tmp_path, kp_env, mount, monkeypatch):
    creds = kp_env.dir / "creds"
    creds.mkdir(mode=0o700)
    kp_env.file(APIKEY, name="creds/apikey")
    backing = str(tmp_path / "data")
    # init takes the API key from $CREDENTIALS_DIRECTORY/apikey too, and says how to mount.
    r = kp_init(emu, backing, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == EXIT_OK, r
    assert r.stdout.splitlines()[-1] == "mount it with: CREDENTIALS_DIRECTORY=%s keyfs %s MOUNTPOINT" % (creds, backing)

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    # Debug output must not leak either; it prints libfuse's 'error: -38' answers, hence allow_errors.
    m = kp_mount(mount, emu, backing, allow_errors=True, extra_args=["-d"])
    write_file(m.path("c"), b"credentials dir")
    assert read_file(m.path("c")) == b"credentials dir"
    m.umount()

    # Neither apikey_file= nor $CREDENTIALS_DIRECTORY: a clear error, exit 4, no mount.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    mnt = tmp_path / "mnt-nokey"
    mnt.mkdir()
    n = len(emu.requests())
    p = run([KEYFS, backing, str(mnt), "-f"], timeout=30)
    assert p.returncode == EXIT_KMS, p
    assert p.stderr.startswith("keyfs: error: key protect: no API key: give an API key file (apikey_file=)"), p.stderr
    assert not is_mounted(str(mnt))
    assert len(emu.requests()) == n

    # keyfs@.service's fallback when /etc/keyfs/NAME.apikey is missing: a credential of one
    # newline. The message names the file the admin has to create.
    empty = kp_env.dir / "creds-empty"
    empty.mkdir(mode=0o700)
    kp_env.file("\n", name="creds-empty/apikey")
    p = run([KEYFS, backing, str(mnt), "-f"], env=dict(os.environ, CREDENTIALS_DIRECTORY=str(empty)), timeout=30)
    assert p.returncode == EXIT_KMS, p
    assert p.stderr == ("keyfs: error: the systemd credential 'apikey' ('%s/apikey') is empty: put the API key in "
                        "the file the unit's LoadCredential=apikey: names (keyfs@NAME.service: "
                        "/etc/keyfs/NAME.apikey)\n" % empty), p.stderr
    assert not is_mounted(str(mnt))
    assert len(emu.requests()) == n


def test_mount_option_ca_file_overrides_the_recorded_one(emu, tmp_path, kp_env):
    backing, apikey_file = make_volume(emu, tmp_path, kp_env)
    assert voldesc(backing)["ca_file"] == emu.ca_file
    other = make_certs(str(tmp_path / "other-ca"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    emu.clear_log()
    p = run([KEYFS, backing, str(mnt), "-f", "-o", "apikey_file=%s,ca_file=%s" % (apikey_file, other.ca_file)],
            timeout=30)
    assert p.returncode == EXIT_KMS, p
    assert "TLS certificate of '%s/identity/token' is not trusted" % emu.url in p.stderr, p.stderr
    assert not is_mounted(str(mnt))
    assert emu.requests() == []


# ---- shutdown ----

def test_unmount_does_not_wait_for_a_stalled_key_service(emu, tmp_path, kp_env, mount):
    """systemctl stop, or an unmount, while the key service hangs: the daemon ends the calls
    under way (pool refills, key polls) instead of waiting out its 30 s request timeout."""
    backing, apikey_file = make_volume(emu, tmp_path, kp_env)
    m = mount(backing=backing, opts=["apikey_file=" + apikey_file, "dek_pool=4", "poll=1"])
    for i in range(3):
        write_file(m.path("f%d" % i), b"x")
    # From now on every call hangs for 25 s; the pool refills and the poller are stuck in one.
    emu.add_fault("latency", ms=25000, count=-1, match="kms")
    wait_for(lambda: any(e["fault"] == "latency" for e in emu.requests(kind="kms")), timeout=5,
             what="a key service call to hang")
    proc = m.proc
    t0 = time.monotonic()
    r = subprocess.run([FUSERMOUNT, "-u", m.mnt])
    assert r.returncode == 0
    assert proc.wait(timeout=20) == 0
    took = time.monotonic() - t0
    m.proc = None
    # A bound far under the 25 s stall: what is asserted is "does not wait for the service".
    assert took < 10, "daemon took %.1f s to exit after the unmount" % took
    with open(m.log) as f:
        log = f.read()
    assert "cancelled" not in log and "unreachable" not in log, log
