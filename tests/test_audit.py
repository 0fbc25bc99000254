# test_audit.py: key identity (an alias resolved to the key's uuid at init), structured audit events, the host view of keyfsctl status
import json
import os
import re
import socket
import subprocess

import pytest

from helpers import (APIKEY, CIPHER, EXIT_OK, FORMAT, FUSERMOUNT, KEYFS, KEYFSCTL, inspect_json, is_mounted, keyfsctl, run,
                     secret_file, wait_for, write_file, read_file)

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


# ---- volumes that named their key by alias: conversion, the hint, a stated alias ----

def crn_of(emu, kid):
    return "crn:v1:bluemix:public:kms:local:a/kpemu:%s:key:%s" % (emu.instance, kid)


def set_fields(path, **fields):
    """Rewrite name=value lines of a .keyfs or a trust record (None: drop the line)."""
    lines, seen = [], set()
    for line in read_file(path).decode().splitlines():
        k = line.split("=", 1)[0]
        if k in fields:
            seen.add(k)
            if fields[k] is not None:
                lines.append("%s=%s" % (k, fields[k]))
        else:
            lines.append(line)
    lines += ["%s=%s" % (k, v) for k, v in fields.items() if k not in seen and v is not None]
    mode = os.stat(path).st_mode & 0o777
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, mode)


def old_alias_volume(emu, tmp_path, alias):
    """A volume as keyfs made it before init resolved the key: key_id is the alias, no key_crn,
    in the description and in the host's trust record alike."""
    apikey = secret_file(tmp_path / "secrets", "apikey", APIKEY)
    emu.create_alias(emu.kid, alias)
    backing = str(tmp_path / "b")
    assert kp_init(emu, backing, apikey, alias).returncode == EXIT_OK
    record = os.path.join(os.environ["KEYFS_TRUST_DIR"], desc(backing)["volume"])
    for path in (os.path.join(backing, ".keyfs"), record):
        set_fields(path, key_id=alias, key_crn=None)
    return backing, apikey, record


def hint(backing, alias):
    return ("keyfsctl: hint: volume '%s' names its key by the alias '%s' (moving the alias would move the volume): "
            "'keyfsctl trust --resolve-key %s' records the key's uuid instead\n" % (backing, alias, backing))


@pytest.mark.fuse
def test_resolve_key_converts_a_volume_that_named_its_key_by_alias(emu, mount, tmp_path):
    backing, apikey, record = old_alias_volume(emu, tmp_path, "old-root")
    m = mount(backing=backing, opts=["apikey_file=" + apikey])
    write_file(m.path("f"), b"written by alias")
    assert inspect_json(os.path.join(backing, "f"))[0]["key"] == "old-root"
    # status, inspect -r and fsck say how to convert it.
    r = run([KEYFSCTL, "status", m.mnt])
    assert r.returncode == EXIT_OK and r.stderr == hint(backing, "old-root"), r
    assert "key: old-root\n" in r.stdout and "key id:" not in r.stdout
    # Mounted: the conversion would race the daemon's lock on .keyfs.
    r = run([KEYFSCTL, "trust", "--resolve-key", "--apikey-file", apikey, backing, "--yes"])
    assert r.returncode == 5 and "already mounted" in r.stderr, r
    m.umount()
    r = run([KEYFSCTL, "inspect", "-r", backing])
    assert r.returncode == EXIT_OK and r.stderr == hint(backing, "old-root"), r
    assert ("backing: %s\nvolume: %s\nformat: %d\ncipher: %s\nkey alias: old-root\nkey uuid: (not recorded)\n"
            "files: 1 (0 empty)\n" % (backing, desc(backing)["volume"], FORMAT, CIPHER)) in r.stdout, r.stdout
    r = run([KEYFSCTL, "fsck", backing, "--apikey-file", apikey])
    assert r.returncode == EXIT_OK and r.stderr.startswith(hint(backing, "old-root")), r

    vol = desc(backing)["volume"]
    crn = crn_of(emu, emu.kid)
    shown = ("volume '%s' (uuid %s) names key 'old-root'; the key service resolves it now:\n"
             "  key_id   old-root -> %s\n"
             "  key_crn  (none) -> %s\n"
             "Recording it binds the volume to this key: moving the alias 'old-root' no longer moves the volume.\n"
             "Record it only if this is the key the volume's files are wrapped with ('keyfsctl fsck' checks).\n"
             % (backing, vol, emu.kid, crn))
    # Without a terminal, --yes is required and nothing changes.
    before = (read_file(os.path.join(backing, ".keyfs")), read_file(record))
    r = run([KEYFSCTL, "trust", "--resolve-key", "--apikey-file", apikey, backing])
    assert r.returncode == 2 and r.stdout == shown, r
    assert (read_file(os.path.join(backing, ".keyfs")), read_file(record)) == before
    emu.clear_log()
    r = run([KEYFSCTL, "trust", "--resolve-key", "--apikey-file", apikey, backing, "--yes"])
    assert r.returncode == EXIT_OK, r
    assert r.stdout == shown + "recorded: key_id %s in '%s/.keyfs' and '%s'\n" % (emu.kid, backing, record)
    # The alias was resolved once, at the trusted service: one identity read (plus the state read).
    assert [e["path"] for e in emu.requests(kind="kms", path="/metadata")] == [
        "/api/v2/keys/old-root/metadata", "/api/v2/keys/old-root/metadata"]
    d = desc(backing)
    assert (d["key"], d["key_id"], d["key_crn"]) == ("old-root", emu.kid, crn)
    rec = read_file(record).decode()
    assert "key=old-root\n" in rec and "key_id=%s\n" % emu.kid in rec and "key_crn=%s\n" % crn in rec
    assert stat_mode(os.path.join(backing, ".keyfs")) == 0o644
    assert not [n for n in os.listdir(backing) if n not in (".keyfs", "f")]      # no temporary left
    # Once is enough; no hint any more.
    r = run([KEYFSCTL, "trust", "--resolve-key", "--apikey-file", apikey, backing])
    assert r.returncode == EXIT_OK and r.stdout == (
        "volume '%s' (uuid %s) records its key's uuid already: key_id %s\n" % (backing, vol, emu.kid)), r
    r = run([KEYFSCTL, "inspect", "-r", "--json", backing])
    assert r.returncode == EXIT_OK and r.stderr == "", r
    assert json.loads(r.stdout)["volumes"] == [{"backing": backing, "volume": vol, "format": FORMAT, "cipher": CIPHER,
                                                "kms": "keyprotect", "key": "old-root", "key_alias": "old-root",
                                                "key_uuid": emu.kid, "key_crn": crn}]

    # The alias moves: the converted volume keeps its key, old files and new.
    emu.move_alias("old-root", emu.create_key("other-root"))
    emu.clear_log()
    m.start()
    assert read_file(m.path("f")) == b"written by alias"
    write_file(m.path("g"), b"written by uuid")
    r = run([KEYFSCTL, "status", m.mnt])
    assert r.stderr == "" and "key id: %s\nkey crn: %s\n" % (emu.kid, crn) in r.stdout, r
    m.umount()
    assert inspect_json(os.path.join(backing, "g"))[0]["key"] == emu.kid
    paths = [e["path"] for e in emu.requests(kind="kms")]
    assert paths and all(p.startswith("/api/v2/keys/%s/" % emu.kid) for p in paths), paths


def stat_mode(path):
    return os.stat(path).st_mode & 0o777


def test_resolve_key_refuses_what_the_host_does_not_trust(emu, tmp_path, keystore):
    backing, apikey, record = old_alias_volume(emu, tmp_path, "old-root")
    # The description names another alias than the host's record: nothing resolved, nothing asked.
    set_fields(os.path.join(backing, ".keyfs"), key_id="evil-root")
    emu.clear_log()
    r = run([KEYFSCTL, "trust", "--resolve-key", "--apikey-file", apikey, backing, "--yes"])
    assert r.returncode == 11, r
    assert r.stderr == ("keyfsctl: error: volume '%s': its .keyfs says key_id 'evil-root' but this host trusts "
                        "'old-root' ('%s'), which is key %s: nothing resolved\n" % (backing, record, emu.kid)), r
    assert "key_id=evil-root\n" in read_file(os.path.join(backing, ".keyfs")).decode()
    # No record at all: trust it first.
    os.unlink(record)
    r = run([KEYFSCTL, "trust", "--resolve-key", "--apikey-file", apikey, backing, "--yes"])
    assert r.returncode == 11 and r.stderr == (
        "keyfsctl: error: volume '%s' (uuid %s) is not trusted on this host: run 'keyfsctl trust %s' first\n"
        % (backing, desc(backing)["volume"], backing)), r
    # A local volume has nothing to resolve.
    local = str(tmp_path / "local")
    keyfsctl("init", local, "--kms", "local", "--keystore", keystore, "--key", "k", "--create-key")
    r = run([KEYFSCTL, "trust", "--resolve-key", local])
    assert r.returncode == EXIT_OK and r.stdout == (
        "volume '%s' (uuid %s) uses a local key: its key_id is the key's uuid already; nothing to resolve\n"
        % (local, desc(local)["volume"])), r


def stated(emu, apikey, alias):
    return ["kms=keyprotect", "key=" + alias, "endpoint=" + emu.url, "instance=" + emu.instance,
            "iam_endpoint=" + emu.url, "ca_file=" + emu.ca_file, "apikey_file=" + apikey]


@pytest.mark.fuse
def test_stated_alias_is_resolved_at_mount(emu, mount, tmp_path):
    """-o key=ALIAS of a volume made with that alias: resolved once; the volume's uuid names the key
    from then on; an alias moved to another key is refused."""
    apikey = secret_file(tmp_path / "secrets", "apikey", APIKEY)
    emu.create_alias(emu.kid, "prod-root")
    backing = str(tmp_path / "b")
    assert kp_init(emu, backing, apikey, "prod-root").returncode == EXIT_OK
    os.unlink(os.path.join(os.environ["KEYFS_TRUST_DIR"], desc(backing)["volume"]))
    emu.clear_log()
    m = mount(backing=backing, opts=stated(emu, apikey, "prod-root"))
    write_file(m.path("f"), b"stated alias")
    m.umount()
    assert inspect_json(os.path.join(backing, "f"))[0]["key"] == emu.kid
    # One call names the alias (the resolution); every other names the uuid.
    paths = [e["path"] for e in emu.requests(kind="kms")]
    assert paths[0] == "/api/v2/keys/prod-root/metadata", paths
    assert all(p.startswith("/api/v2/keys/%s/" % emu.kid) for p in paths[1:]), paths

    other = emu.create_key("other-root")
    emu.move_alias("prod-root", other)
    mnt = str(tmp_path / "mnt2")
    os.mkdir(mnt)
    r = run([KEYFS, backing, mnt, "-o", ",".join(stated(emu, apikey, "prod-root"))])
    if is_mounted(mnt):
        subprocess.run([FUSERMOUNT, "-u", mnt], stdin=subprocess.DEVNULL, capture_output=True)
        pytest.fail("keyfs mounted a volume whose stated alias moved:\n%s" % r.stderr, pytrace=False)
    assert r.returncode == 11, r
    assert ("keyfs: error: volume '%s': its .keyfs says key_id '%s' but key 'prod-root' the mount options state "
            "is key '%s' now: refusing it" % (backing, emu.kid, other)) in r.stderr.splitlines(), r.stderr
    [rf] = of_kind(r.stderr, "refused")
    assert rf["reason"] == "trust_mismatch" and rf["key_id"] == emu.kid


# ---- the FUSE threads never wait for audit I/O ----

def ctl_request(mnt, request):
    """One request on the mount's control socket (include/keyfs/control.h): the status object."""
    d = "/run/keyfs" if os.geteuid() == 0 else "/run/user/%d/keyfs" % os.geteuid()
    h = 0xcbf29ce484222325
    for b in os.path.realpath(mnt).encode():
        h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect("%s/%016x.sock" % (d, h))
        s.sendall(request.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(8192)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


STORM = 50


@pytest.mark.fuse
@pytest.mark.parametrize("sink", ["full", "drained"])
def test_a_journal_that_takes_nothing_costs_the_mount_nothing(tmp_path, keystore, mount, monkeypatch, sink):
    """The journal socket is full (nobody reads it): a lock/unlock storm with I/O in between goes on,
    and every event is dropped and counted. Drained, every event arrives and none is dropped."""
    import threading
    import time

    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    received, stop = [], threading.Event()
    try:
        if sink == "full":
            # Fill its queue: then a sender that does not wait gets EAGAIN at once.
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            filler.setblocking(False)
            try:
                while True:
                    filler.sendto(b"x", path)
            except BlockingIOError:
                pass
            filler.close()
        else:
            def drain():
                sock.settimeout(0.05)
                while not stop.is_set():
                    try:
                        received.append(sock.recv(65536).decode())
                    except socket.timeout:
                        pass
            reader = threading.Thread(target=drain)
            reader.start()
        monkeypatch.setenv("KEYFS_AUDIT", "journal")
        monkeypatch.setenv("KEYFS_AUDIT_SOCKET", path)
        backing = str(tmp_path / "b")
        keyfsctl("init", backing, "--kms", "local", "--keystore", keystore, "--key", "k", "--create-key")
        m = mount(backing=backing)
        write_file(m.path("f"), b"0")
        dropped0 = ctl_request(m.mnt, "status")["audit_dropped"]
        t0 = time.monotonic()
        for i in range(STORM):
            assert ctl_request(m.mnt, "lock")["state"] == "locked"
            assert ctl_request(m.mnt, "unlock")["state"] == "unlocked"
            write_file(m.path("f"), b"%d" % i * 1000)
            assert read_file(m.path("f")) == b"%d" % i * 1000
        elapsed = time.monotonic() - t0
        st = ctl_request(m.mnt, "status")
        print("\naudit sink %s: %d lock/unlock cycles with a write and a read each in %.3f s (%.1f ms a cycle); "
              "dropped %d" % (sink, STORM, elapsed, elapsed * 1000 / STORM, st["audit_dropped"] - dropped0))
        # Four events a cycle: manual_lock, lock, manual_unlock, unlock.
        if sink == "full":
            # The emitter gives a full journal 0.5 s for the first record, then drops the rest
            # at once until one goes through.
            wait_for(lambda: ctl_request(m.mnt, "status")["audit_dropped"] - dropped0 == 4 * STORM, timeout=5,
                     what="every event of the storm counted as dropped")
        else:
            assert st["audit_dropped"] == 0, st
            wait_for(lambda: sum("KEYFS_EVENT=manual_unlock\n" in d for d in received) == STORM, timeout=10,
                     what="every manual_unlock event")
            assert sum("KEYFS_EVENT=lock\n" in d for d in received) == STORM
        m.umount()
        # The first drop is logged, once; the rest are counted only.
        assert m.stderr().count("audit: an event was dropped") == (1 if sink == "full" else 0), m.stderr()
    finally:
        stop.set()
        if sink == "drained":
            reader.join()
        sock.close()


@pytest.mark.fuse
def test_a_journal_that_falls_behind_for_a_moment_loses_nothing(tmp_path, keystore, mount, monkeypatch):
    """The journal stops reading for 0.2 s while 24 events come: its socket queues 10 datagrams
    (net.unix.max_dgram_qlen), the daemon's own queue the rest, and the emitter gives the socket
    up to 0.5 s to take each record: every event arrives, none is dropped."""
    import threading
    import time

    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    received, reading = [], threading.Event()

    def drain():
        # Reads once told to, until 24 events came or none for 1 s.
        reading.wait()
        sock.settimeout(1.0)
        while len(received) < 24:
            try:
                received.append(sock.recv(65536).decode())
            except OSError:             # socket.timeout included
                return
    reader = threading.Thread(target=drain)
    reader.start()
    try:
        monkeypatch.setenv("KEYFS_AUDIT", "journal")
        monkeypatch.setenv("KEYFS_AUDIT_SOCKET", path)
        backing = str(tmp_path / "b")
        keyfsctl("init", backing, "--kms", "local", "--keystore", keystore, "--key", "k", "--create-key")
        # The mount's own events first (none expected here, but read them off before the pause).
        m = mount(backing=backing)
        dropped0 = ctl_request(m.mnt, "status")["audit_dropped"]
        t0 = time.monotonic()
        for _ in range(6):          # four events a cycle: manual_lock, lock, manual_unlock, unlock
            assert ctl_request(m.mnt, "lock")["state"] == "locked"
            assert ctl_request(m.mnt, "unlock")["state"] == "unlocked"
        time.sleep(max(0.0, 0.2 - (time.monotonic() - t0)))
        reading.set()
        reader.join(10)
        assert not reader.is_alive()
        events = [re.search(r"KEYFS_EVENT=(\w+)\n", d).group(1) for d in received]
        assert sorted(events) == sorted(["lock", "manual_lock", "unlock", "manual_unlock"] * 6), events
        assert ctl_request(m.mnt, "status")["audit_dropped"] == dropped0 == 0
        m.umount()
        assert "audit: an event was dropped" not in m.stderr()
    finally:
        reading.set()
        sock.close()
        reader.join(10)
