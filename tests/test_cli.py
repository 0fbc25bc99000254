# test_cli.py: keyfsctl key administration, inspect (human and --json), --version of both binaries
import contextlib
import json
import os
import re
import socket
import stat
import threading

import pytest

from helpers import (CIPHER, EXIT_EXISTS, FORMAT, KEYFS, KEYFSCTL, backing_size, inspect_json, key_show, keyfsctl,
                     project_version, read_file, run, write_file)

B64_MATERIAL = re.compile(r"[A-Za-z0-9+/]{42,}={0,2}")
HEX_MATERIAL = re.compile(r"\b[0-9a-fA-F]{64}\b")


def _state(keystore, name):
    out, fields = key_show(keystore, name)
    assert "state" in fields, "no state in key show output:\n%s" % out
    return fields["state"].split()[0].strip("\"'(),").lower()


def test_key_lifecycle(keystore):
    r = keyfsctl("key", "create", "life", "--keystore", keystore)
    assert stat.S_IMODE(os.stat(keystore).st_mode) == 0o700
    kf = os.path.join(keystore, "life.key")
    mf = os.path.join(keystore, "life.v1.material")
    assert stat.S_IMODE(os.stat(kf).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(mf).st_mode) == 0o600
    # The state file holds no material: its rewrites by suspend and enable copy none.
    text = read_file(kf).decode()
    assert not B64_MATERIAL.search(text) and not HEX_MATERIAL.search(text), text
    assert len(read_file(mf)) == 112

    out, fields = key_show(keystore, "life")
    assert _state(keystore, "life") == "active"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", fields.get("id", "")), out
    # key show never prints material.
    assert not B64_MATERIAL.search(out) and not HEX_MATERIAL.search(out), out

    keyfsctl("key", "suspend", "life", "--keystore", keystore)
    assert _state(keystore, "life") == "suspended"
    keyfsctl("key", "enable", "life", "--keystore", keystore)
    assert _state(keystore, "life") == "active"
    assert stat.S_IMODE(os.stat(kf).st_mode) == 0o600

    keyfsctl("key", "destroy", "life", "--keystore", keystore)
    assert _state(keystore, "life") == "destroyed"
    assert sorted(os.listdir(keystore)) == ["life.key"]
    text = read_file(kf).decode()
    assert "destroyed" in text.lower() or re.search(r"state\s*[=:]\s*5\b", text), text
    for line in text.splitlines():
        assert not B64_MATERIAL.search(line) and not HEX_MATERIAL.search(line), "material left: %r" % line

    r = run([KEYFSCTL, "key", "create", "life", "--keystore", keystore])
    assert r.returncode == EXIT_EXISTS, r.stderr
    r = run([KEYFSCTL, "key", "enable", "life", "--keystore", keystore])
    assert r.returncode != 0, "a destroyed key was enabled"
    assert _state(keystore, "life") == "destroyed"


def test_key_create_two_keys_differ(keystore):
    keyfsctl("key", "create", "a", "--keystore", keystore)
    keyfsctl("key", "create", "b", "--keystore", keystore)
    _, fa = key_show(keystore, "a")
    _, fb = key_show(keystore, "b")
    assert fa["id"] != fb["id"]
    ma = read_file(os.path.join(keystore, "a.v1.material"))[48:80]
    mb = read_file(os.path.join(keystore, "b.v1.material"))[48:80]
    assert len(ma) == 32 and ma != mb


def test_init_writes_voldesc(volume, keystore):
    p = os.path.join(volume, ".keyfs")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    fields = dict(line.split("=", 1) for line in read_file(p).decode().splitlines()
                  if line and not line.startswith("#"))
    _, key = key_show(keystore, "test")
    assert fields["format"] == str(FORMAT)          # keyfsctl init --format (tests/layout.py)
    assert fields["kms"] == "local"
    assert fields["key"] == "test"
    assert fields["key_id"] == key["id"]
    assert os.path.abspath(fields["keystore"]) == os.path.abspath(keystore)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", fields["volume"])
    assert os.listdir(volume) == [".keyfs"]


def _check_info(info, path, size, key_id):
    assert info["path"] == path
    assert info["format"] == FORMAT
    assert info["cipher"] == CIPHER
    assert info["chunk_size"] == 4096
    assert re.fullmatch(r"[0-9a-f]{32}", info["file_id"]), info
    assert info["key"] == key_id
    assert info["key_version"] == "1"
    assert info["plaintext_size"] == size
    assert re.fullmatch(r"[0-9a-f]{64}", info["wrapped_dek_sha256"]), info


@pytest.mark.parametrize("size", [0, 1, 4096, 10000])
def test_inspect_json(mnt, keystore, size):
    write_file(mnt.path("f"), os.urandom(size))
    write_file(mnt.path("g"), b"other")
    _, key = key_show(keystore, "test")
    bf, mf, bg = mnt.bpath("f"), mnt.path("f"), mnt.bpath("g")
    assert os.stat(bf).st_size == backing_size(size)
    via_backing, via_mount, other = inspect_json(bf, mf, bg)
    _check_info(via_backing, bf, size, key["id"])
    _check_info(via_mount, mf, size, key["id"])
    _check_info(other, bg, 5, key["id"])
    assert via_backing["file_id"] == via_mount["file_id"]
    assert via_backing["wrapped_dek_sha256"] == via_mount["wrapped_dek_sha256"]
    assert via_backing["file_id"] != other["file_id"]
    assert via_backing["wrapped_dek_sha256"] != other["wrapped_dek_sha256"]
    # The file id is in the header, in clear.
    assert bytes.fromhex(via_backing["file_id"]) in read_file(bf)[:1024]


def test_inspect_json_after_unmount_and_destroy(mnt, keystore):
    write_file(mnt.path("f"), b"x" * 5000)
    info = inspect_json(mnt.bpath("f"))[0]
    mnt.umount()
    keyfsctl("key", "destroy", "test", "--keystore", keystore)
    # No key needed: still inspectable after a shred.
    again = inspect_json(mnt.bpath("f"))[0]
    for k in ("path", "format", "cipher", "chunk_size", "file_id", "key", "key_version", "plaintext_size",
              "wrapped_dek_sha256"):
        assert again[k] == info[k], k
    assert again["plaintext_size"] == 5000


def test_inspect_human(mnt, keystore):
    write_file(mnt.path("f"), b"y" * 12345)
    _, key = key_show(keystore, "test")
    fid = inspect_json(mnt.bpath("f"))[0]["file_id"]
    for p in (mnt.bpath("f"), mnt.path("f")):
        r = keyfsctl("inspect", p)
        assert p in r.stdout
        assert fid in r.stdout
        assert "12345" in r.stdout
        assert "cipher: %s\n" % CIPHER in r.stdout
        assert key["id"] in r.stdout


def test_inspect_mount_root_dir_refused(mnt):
    r = run([KEYFSCTL, "inspect", mnt.mnt])
    assert r.returncode != 0
    assert mnt.mnt in r.stderr


def test_versions():
    v = project_version()
    assert v == "0.1.0"
    for exe in (KEYFS, KEYFSCTL):
        r = run([exe, "--version"])
        assert r.returncode == 0, r.stderr
        assert re.search(r"(^|\s)v?%s(\s|$)" % re.escape(v), r.stdout), r.stdout


def test_help():
    for exe in (KEYFS, KEYFSCTL):
        r = run([exe, "--help"])
        assert r.returncode == 0, r.stderr
        assert "usage" in r.stdout.lower()
    r = run([KEYFSCTL, "help"])
    assert r.returncode == 0
    assert "inspect" in r.stdout and "init" in r.stdout


# ---- what the daemon says reaches the admin's terminal only as text ----

def _control_socket(mnt):
    """The mount's control socket (util/control.c: FNV-1a of the mountpoint)."""
    h = 0xcbf29ce484222325
    for b in os.fsencode(os.path.realpath(mnt)):
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    d = "/run/keyfs" if os.getuid() == 0 else "/run/user/%d/keyfs" % os.getuid()
    return os.path.join(d, "%016x.sock" % h)


@contextlib.contextmanager
def _fake_daemon(mnt, answer):
    """Answer every control request with `answer` (bytes) in place of the mount's daemon,
    whose socket is moved aside meanwhile and put back after."""
    path = _control_socket(mnt)
    assert os.path.exists(path), path
    aside = path + ".real"
    os.rename(path, aside)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            with conn:
                conn.recv(256)
                conn.sendall(answer + b"\n")

    try:
        srv.bind(path)
        srv.listen(4)
        srv.settimeout(0.1)
        t = threading.Thread(target=serve)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
    finally:
        srv.close()
        if os.path.exists(path):
            os.unlink(path)
        os.rename(aside, path)


NASTY = "\x1b]2;owned\x07\x1b[2J\x9b31m\x7f"
CLEAN = "\\033]2;owned\\007\\033[2J\\302\\23331m\\177"


def _no_controls(text):
    return not any(c in text for c in "\x1b\x07\x9b\x7f")


def test_control_answers_are_filtered(mount):
    m = mount()
    mp = os.path.realpath(m.mnt)
    # An error from the daemon: printed as text, escapes shown as \ooo like file names.
    with _fake_daemon(m.mnt, json.dumps({"error": "denied " + NASTY}, ensure_ascii=False).encode()):
        r = run([KEYFSCTL, "status", m.mnt])
    assert r.returncode == 1, r
    assert _no_controls(r.stdout + r.stderr), repr(r.stderr)
    assert r.stderr == "keyfsctl: error: '%s': denied %s\n" % (m.mnt, CLEAN)

    # A locked state whose reason and fields carry escapes: status, unlock and --json.
    doc = {"state": "locked", "reason": "key-" + NASTY, "key": "k" + NASTY, "key_state": None,
           "last_poll": None, "poll": 30, "grace": 300, "deactivated": False,
           "backing": m.backing, "mountpoint": mp}
    with _fake_daemon(m.mnt, json.dumps(doc, ensure_ascii=False).encode()):
        st = run([KEYFSCTL, "status", m.mnt])
        un = run([KEYFSCTL, "unlock", m.mnt])
        js = run([KEYFSCTL, "status", "--json", m.mnt])
    assert st.returncode == 8, st
    assert _no_controls(st.stdout + st.stderr), repr(st.stdout)
    assert st.stdout.splitlines()[:2] == ["state: locked (key-%s)" % CLEAN, "key: k%s" % CLEAN]
    assert un.returncode == 8, un
    assert _no_controls(un.stdout + un.stderr), repr(un.stderr)
    assert un.stderr.endswith("keyfsctl: error: '%s' stays locked: key-%s\n" % (m.mnt, CLEAN))
    assert js.returncode == 8, js
    assert _no_controls(js.stdout), repr(js.stdout)
    # Members an older daemon does not send read as null; the key named by an alias gets its hint.
    assert json.loads(js.stdout) == dict(doc, volume=None, key_id=None, key_crn=None, last_good_age=None,
                                         kms_calls=None, kms_errors=None, kms_latency_ms=None,
                                         kms_latency_avg_ms=None, files_keyed=None, audit_dropped=None,
                                         kms_wraps=None, kms_unwraps=None, kms_key_errors=None)
    doc["key_id"] = "k" + NASTY
    with _fake_daemon(m.mnt, json.dumps(doc, ensure_ascii=False).encode()):
        st = run([KEYFSCTL, "status", m.mnt])
    assert st.returncode == 8 and _no_controls(st.stdout + st.stderr), repr(st.stderr)
    assert "names its key by the alias" in st.stderr and "'keyfsctl trust --resolve-key " in st.stderr

    # The real daemon answers again.
    assert run([KEYFSCTL, "status", m.mnt]).returncode == 0
