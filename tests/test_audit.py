# test_audit.py: key identity (an alias resolved to the key's uuid at init), structured audit events, the host view of keyfsctl status
import json
import os
import re
import socket
import subprocess

import pytest

from helpers import (APIKEY, EXIT_OK, KEYFSCTL, inspect_json, keyfsctl, run, secret_file, wait_for, write_file,
                     read_file)

AUDIT_LINE = re.compile(r"^keyfs(?:ctl)?: audit: (\w+)((?: \w+=(?:\"(?:[^\"\\]|\\.)*\"|\S+))*)$")
FIELD = re.compile(r" (\w+)=(\"(?:[^\"\\]|\\.)*\"|\S+)")


def events(text):
    """[(kind, {field: value})] of the audit lines in a daemon or keyfsctl output."""
    out = []
    for line in text.splitlines():
        m = AUDIT_LINE.match(line)
        if m:
            out.append((m.group(1), {k: v.strip('"') for k, v in FIELD.findall(m.group(2))}))
    return out


def of_kind(text, kind):
    return [f for k, f in events(text) if k == kind]


@pytest.fixture(autouse=True)
def audit_env(monkeypatch):
    monkeypatch.setenv("KEYFS_AUDIT", "stderr")
    monkeypatch.setenv("KEYFS_TEST_BACKOFF_SCALE", "0.01")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("KEYFS_AUDIT_SOCKET", raising=False)


def kp_init(emu, backing, apikey, key):
    return run([KEYFSCTL, "init", backing, "--kms", "keyprotect", "--endpoint", emu.url, "--iam-endpoint", emu.url,
                "--instance", emu.instance, "--key", key, "--apikey-file", apikey, "--ca-file", emu.ca_file])


def desc(backing):
    d = {}
    for line in read_file(os.path.join(backing, ".keyfs")).decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            d[k] = v
    return d


@pytest.mark.fuse
def test_alias_resolves_to_uuid_and_a_moved_alias_changes_nothing(emu, mount, tmp_path):
    apikey = secret_file(tmp_path / "secrets", "apikey", APIKEY)
    emu.create_alias(emu.kid, "prod-root")
    backing = str(tmp_path / "b")
    r = kp_init(emu, backing, apikey, "prod-root")
    assert r.returncode == EXIT_OK, r
    d = desc(backing)
    assert d["key"] == "prod-root"
    assert d["key_id"] == emu.kid
    assert d["key_crn"] == "crn:v1:bluemix:public:kms:local:a/kpemu:%s:key:%s" % (emu.instance, emu.kid)
    # The host's trust record carries the same identity.
    rec = read_file(os.path.join(os.environ["KEYFS_TRUST_DIR"], d["volume"])).decode()
    assert "key_id=%s\n" % emu.kid in rec and "key_crn=%s\n" % d["key_crn"] in rec

    m = mount(backing=backing, opts=["apikey_file=" + apikey])
    write_file(m.path("f"), b"before the move")
    st = keyfsctl("status", m.mnt).stdout
    assert "key: prod-root\n" in st and "key id: %s\n" % emu.kid in st and "key crn: %s\n" % d["key_crn"] in st
    m.umount()
    assert inspect_json(os.path.join(backing, "f"))[0]["key"] == emu.kid

    other = emu.create_key("other-root")
    emu.move_alias("prod-root", other)
    emu.clear_log()
    m.start()
    assert read_file(m.path("f")) == b"before the move"
    write_file(m.path("g"), b"after the move")
    m.umount()
    assert inspect_json(os.path.join(backing, "g"))[0]["key"] == emu.kid
    paths = [e["path"] for e in emu.requests(kind="kms")]
    assert paths and all(p.startswith("/api/v2/keys/%s/" % emu.kid) for p in paths), paths
    assert not any("prod-root" in p or other in p for p in paths)


def test_unknown_alias_is_refused_at_init(emu, tmp_path):
    apikey = secret_file(tmp_path / "secrets", "apikey", APIKEY)
    r = kp_init(emu, str(tmp_path / "b"), apikey, "no-such-alias")
    assert r.returncode == 4, r
    assert "key 'no-such-alias' not found" in r.stderr
    assert not os.path.exists(str(tmp_path / "b" / ".keyfs"))


@pytest.mark.fuse
def test_each_event_once_with_its_fields(emu, mount, tmp_path):
    apikey = secret_file(tmp_path / "secrets", "apikey", APIKEY)
    backing = str(tmp_path / "b")
    assert kp_init(emu, backing, apikey, emu.kid).returncode == EXIT_OK
    vol = desc(backing)["volume"]
    crn = desc(backing)["key_crn"]
    m = mount(backing=backing, opts=["apikey_file=" + apikey, "poll=1", "grace=300"], allow_errors=True)
    write_file(m.path("f"), b"x" * 5000)

    def logged(kind, n=1):
        wait_for(lambda: len(of_kind(m.stderr(), kind)) >= n, timeout=15, what="audit event " + kind)
        return of_kind(m.stderr(), kind)

    # Manual lock and unlock: the uid comes from SO_PEERCRED.
    keyfsctl("lock", m.mnt)
    [ml] = logged("manual_lock")
    assert ml["uid"] == str(os.getuid()) and ml["reason"] == "locked"
    [lk] = logged("lock")
    assert lk["reason"] == "manual"
    keyfsctl("unlock", m.mnt)
    [mu] = logged("manual_unlock")
    assert mu["uid"] == str(os.getuid()) and mu["reason"] == "unlocked"
    [ul] = logged("unlock")
    for f in (ml, lk, mu, ul):
        assert f["volume"] == vol and f["mountpoint"] == m.mnt and f["key_id"] == emu.kid and f["key_crn"] == crn

    # The key service goes away and comes back within grace.
    emu.go_down()
    [gs] = logged("grace_start")
    assert gs["reason"] == "unreachable" and gs["volume"] == vol
    emu.come_up()
    [ge] = logged("grace_end")
    assert ge["reason"] == "answered" and int(ge["latency_ms"]) >= 0

    # A rotation is picked up when an unwrap hands back a re-wrapped key.
    emu.key_action(emu.kid, "rotate")
    m.umount()
    m.start()
    assert read_file(m.path("f")) == b"x" * 5000
    [ro] = logged("rotation")
    assert ro["key_version"] == emu.key(emu.kid).latest["id"]

    # A shred: the poll that sees it locks the mount, with the answer's correlation id.
    emu.key_action(emu.kid, "delete")
    # (m.stderr() is the log of the daemon started last: it has locked once.)
    wait_for(lambda: of_kind(m.stderr(), "lock"), timeout=15, what="shred lock")
    [shred] = of_kind(m.stderr(), "lock")
    assert shred["reason"] == "key-destroyed" and shred["key_id"] == emu.kid
    assert re.fullmatch(r"[0-9a-f-]{36}", shred.get("correlation_id", "")), shred
    assert 0 <= int(shred["latency_ms"]) < 1000
    m.umount()
    text = "".join(read_file(p).decode() for p in m.logs)
    for kind in ("manual_lock", "manual_unlock", "grace_start", "grace_end", "rotation"):
        assert len(of_kind(text, kind)) == 1, (kind, text)


def test_rewrap_and_refused_events(tmp_path, keystore):
    backing = str(tmp_path / "b")
    keyfsctl("init", backing, "--kms", "local", "--keystore", keystore, "--key", "k", "--create-key")
    vol = desc(backing)["volume"]
    r = run([KEYFSCTL, "rewrap", backing])
    assert r.returncode == EXIT_OK, r
    [rw] = of_kind(r.stderr, "rewrap")
    assert rw["volume"] == vol and rw["reason"] == "complete" and rw["uid"] == str(os.getuid())
    assert rw["key_id"] == desc(backing)["key_id"]
    # The description now points at another keystore than the host trusts.
    text = read_file(os.path.join(backing, ".keyfs")).decode().replace("keystore=" + keystore,
                                                                        "keystore=" + keystore + "-evil")
    with open(os.path.join(backing, ".keyfs"), "w") as f:
        f.write(text)
    r = run([KEYFSCTL, "fsck", backing])
    assert r.returncode == 11, r
    [rf] = of_kind(r.stderr, "refused")
    assert rf["volume"] == vol and rf["reason"] == "trust_mismatch" and rf["backing"] == os.path.realpath(backing)


def test_journal_native_protocol(tmp_path, keystore, monkeypatch):
    """Events go to the journal socket as KEY=value lines with the kind's MESSAGE_ID."""
    sock_path = str(tmp_path / "journal.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    try:
        monkeypatch.setenv("KEYFS_AUDIT", "journal")
        monkeypatch.setenv("KEYFS_AUDIT_SOCKET", sock_path)
        backing = str(tmp_path / "b")
        keyfsctl("init", backing, "--kms", "local", "--keystore", keystore, "--key", "k", "--create-key")
        r = run([KEYFSCTL, "rewrap", backing])
        assert r.returncode == EXIT_OK and "audit:" not in r.stderr, r
        s.settimeout(5)
        data = s.recv(65536).decode()
    finally:
        s.close()
    fields = dict(line.split("=", 1) for line in data.rstrip("\n").split("\n"))
    assert fields["MESSAGE_ID"] == "f84c3990a0e24014a3178027ce57955c"
    assert fields["KEYFS_EVENT"] == "rewrap" and fields["SYSLOG_IDENTIFIER"] == "keyfsctl"
    assert fields["KEYFS_VOLUME"] == desc(backing)["volume"] and fields["KEYFS_REASON"] == "complete"
    assert fields["PRIORITY"] == "5" and fields["MESSAGE"].startswith("rewrap: 0 files")


# ---- the host view ----

METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)?\})? '
                    r'(-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|NaN|[+-]Inf)( -?[0-9]+)?$')
HELP = re.compile(r"^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$")
TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prometheus(text):
    """Every line checked against the text exposition format; {(name, labels): value}."""
    assert text.endswith("\n")
    samples, typed = {}, {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            assert HELP.match(line), line
            continue
        if line.startswith("# TYPE "):
            m = TYPE.match(line)
            assert m and m.group(1) not in typed, line
            typed[m.group(1)] = m.group(2)
            continue
        m = METRIC.match(line)
        assert m, "not a sample line: %r" % line
        assert m.group(1) in typed, "sample before its TYPE: %r" % line
        labels = tuple(sorted((k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                              for k, v in LABEL.findall(m.group(3) or "")))
        assert (m.group(1), labels) not in samples, "duplicate sample: %r" % line
        samples[(m.group(1), labels)] = float(m.group(4))
    return samples, typed


@pytest.mark.fuse
def test_status_lists_every_mount_and_prometheus_parses(tmp_path, keystore, mount):
    mounts = []
    for i, name in enumerate(("a", 'we"ird\\one', "c")):
        backing = str(tmp_path / ("b%d" % i))
        keyfsctl("init", backing, "--kms", "local", "--keystore", keystore, "--key", "k%d" % i, "--create-key")
        mnt = str(tmp_path / name)
        os.mkdir(mnt)
        mounts.append(mount(backing=backing, mnt=mnt))
    write_file(mounts[0].path("f"), b"data")
    keyfsctl("lock", mounts[1].mnt)

    r = run([KEYFSCTL, "status", "--json"])
    doc = json.loads(r.stdout)
    ours = {d["mountpoint"]: d for d in doc if d.get("mountpoint") in [m.mnt for m in mounts]}
    assert len(ours) == 3
    assert [ours[m.mnt]["state"] for m in mounts] == ["unlocked", "locked", "unlocked"]
    assert ours[mounts[1].mnt]["reason"] == "manual"
    assert ours[mounts[0].mnt]["key_state"] == 1 and ours[mounts[0].mnt]["volume"] == desc(mounts[0].backing)["volume"]

    text = run([KEYFSCTL, "status"]).stdout
    # (The text form escapes the backslash of the odd name: only --json gives paths back verbatim.)
    rows = [l for l in text.splitlines() if " " + str(tmp_path) + "/" in l]
    assert len(rows) == 3 and rows[1].split()[:2] == ["locked", "manual"]

    r = run([KEYFSCTL, "status", "--prometheus"])
    samples, typed = parse_prometheus(r.stdout)
    assert typed["keyfs_mount_locked"] == "gauge" and typed["keyfs_kms_errors_total"] == "counter"
    for i, m in enumerate(mounts):
        labels = tuple(sorted({"mountpoint": m.mnt, "volume": desc(m.backing)["volume"],
                               "key_id": desc(m.backing)["key_id"]}.items()))
        assert samples[("keyfs_mount_locked", labels)] == (1.0 if i == 1 else 0.0)
        assert samples[("keyfs_mount_up", labels)] == 1.0
        assert samples[("keyfs_kms_errors_total", labels)] == 0.0
        assert ("keyfs_last_good_poll_age_seconds", labels) in samples
    keyfsctl("unlock", mounts[1].mnt)


@pytest.mark.fuse
def test_key_state_prints_its_name_only(mount):
    m = mount()
    out = keyfsctl("status", m.mnt).stdout
    assert "key state: active\n" in out and "key state: 1" not in out
    assert json.loads(keyfsctl("status", "--json", m.mnt).stdout)["key_state"] == 1
