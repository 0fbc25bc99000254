# test_rewrap.py: keyfsctl key rotate and keyfsctl rewrap: every DEK onto the newest key version, data untouched, resumable, beside a live mount
import os
import struct
import threading

import pytest

from helpers import (EXIT_OK, HEADER_AREA, HEADER_SIZE, KEYFSCTL, init_keyprotect, inspect_json, read_file, run,
                     sha256, write_file)

EXIT_KMS = 4
EXIT_DAMAGED = 7
EXIT_LOCKED = 8
GEN_OFFSET = 36                     # header generation, little-endian u32 (docs/FORMAT.md)


def tree(root):
    """A few files of sizes around chunk edges, in nested dirs, plus an empty one."""
    files = {"a.txt": b"alpha\n", "empty": b"", "d/b.bin": os.urandom(4096), "d/e/c.bin": os.urandom(10000),
             "d/e/big": os.urandom(300000)}
    for rel, data in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        write_file(p, data)
    return files


def backing_state(backing, rel):
    """(generation of each header slot, sha256 of everything after the header area)."""
    with open(os.path.join(backing, rel), "rb") as f:
        data = f.read()
    gens = [struct.unpack_from("<I", data, s * HEADER_SIZE + GEN_OFFSET)[0] for s in (0, 1)]
    return gens, sha256(data[HEADER_AREA:])


def versions(backing, rels):
    return {rel: inspect_json(os.path.join(backing, rel))[0]["key_version"] for rel in rels}


def rewrap(backing, *extra):
    return run([KEYFSCTL, "rewrap", backing, *extra])


# ---- the local keystore ----

@pytest.fixture
def local(tmp_path):
    ks = str(tmp_path / "keystore")
    backing = str(tmp_path / "backing")
    r = run([KEYFSCTL, "init", backing, "--kms", "local", "--keystore", ks, "--key", "root", "--create-key"])
    assert r.returncode == EXIT_OK, r
    return backing, ks


def rotate_local(ks):
    r = run([KEYFSCTL, "key", "rotate", "root", "--keystore", ks])
    assert r.returncode == EXIT_OK, r
    return r


def test_key_rotate_adds_a_version(local):
    backing, ks = local
    r = rotate_local(ks)
    assert "new files are wrapped with version 2" in r.stdout
    r = run([KEYFSCTL, "key", "show", "root", "--keystore", ks])
    assert "version: 2\n" in r.stdout
    rotate_local(ks)
    r = run([KEYFSCTL, "key", "show", "root", "--keystore", ks])
    assert "version: 3\n" in r.stdout


def test_key_rotate_refuses_suspended_and_destroyed(local):
    backing, ks = local
    assert run([KEYFSCTL, "key", "suspend", "root", "--keystore", ks]).returncode == EXIT_OK
    r = run([KEYFSCTL, "key", "rotate", "root", "--keystore", ks])
    assert r.returncode == EXIT_LOCKED
    assert "is suspended: only an active key can be rotated" in r.stderr
    assert run([KEYFSCTL, "key", "destroy", "root", "--keystore", ks]).returncode == EXIT_OK
    r = run([KEYFSCTL, "key", "rotate", "root", "--keystore", ks])
    assert r.returncode == EXIT_LOCKED


def test_rewrap_local_after_rotation(local, mount):
    backing, ks = local
    m = mount(backing=backing)
    files = tree(m.mnt)
    m.umount()
    # A file made through the mount has a header from its creation, empty or not; a backing
    # file of 0 bytes has none yet (a damaged file truncated to 0 is one).
    write_file(os.path.join(backing, "d", "no-header"), b"")
    nonempty = list(files)
    before = {rel: backing_state(backing, rel) for rel in nonempty}
    assert set(versions(backing, nonempty).values()) == {"1"}

    rotate_local(ks)
    # Rotation alone changes no file: old versions still unwrap.
    assert set(versions(backing, nonempty).values()) == {"1"}
    r = rewrap(backing)
    assert r.returncode == EXIT_OK, r
    assert r.stdout == "rewrap: 6 files: 5 re-wrapped to key version 2, 0 already on it, 1 empty (no key yet)\n"
    assert r.stderr == ""
    assert versions(backing, nonempty) == {rel: "2" for rel in nonempty}
    for rel in nonempty:
        (g0, g1), data_hash = backing_state(backing, rel)
        (b0, b1), data_before = before[rel]
        # Data untouched; the new header is in the other slot, one generation newer, and the
        # old slot is cleared (all zero: unused) once the new one is durable.
        assert data_hash == data_before
        assert (g0, g1) == (0, b0 + 1)
    assert os.path.getsize(os.path.join(backing, "d", "no-header")) == 0

    # Run again: nothing left to do.
    r = rewrap(backing)
    assert r.returncode == EXIT_OK, r
    assert r.stdout == "rewrap: 6 files: 0 re-wrapped to key version 2, 5 already on it, 1 empty (no key yet)\n"

    # Another rotation: the new header goes back to slot 0.
    rotate_local(ks)
    assert rewrap(backing).returncode == EXIT_OK
    assert versions(backing, nonempty) == {rel: "3" for rel in nonempty}
    assert backing_state(backing, "a.txt")[0] == [3, 0]

    m = mount(backing=backing)
    for rel, data in files.items():
        assert read_file(m.path(rel)) == data


def test_rewrap_beside_a_live_mount(local, mount):
    backing, ks = local
    m = mount(backing=backing)
    files = tree(m.mnt)
    rotate_local(ks)
    # A descriptor opened before the rewrap keeps working, and so do writes during it.
    fd = os.open(m.path("d/e/big"), os.O_RDWR)
    try:
        stop = threading.Event()
        errors = []

        def writer():
            i = 0
            while not stop.is_set():
                try:
                    write_file(m.path("during-%d" % (i % 20)), b"x" * (i % 9000))
                except OSError as e:
                    errors.append(e)
                    return
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            r = rewrap(backing)
        finally:
            stop.set()
            t.join()
        assert errors == []
        assert r.returncode == EXIT_OK, r
        assert os.pread(fd, 300000, 0) == files["d/e/big"]
        os.pwrite(fd, b"after", 0)
    finally:
        os.close(fd)
    files["d/e/big"] = b"after" + files["d/e/big"][5:]
    # Every file written during the run is readable and re-wrapped by a second run.
    r = rewrap(backing)
    assert r.returncode == EXIT_OK, r
    assert ", 0 failed" not in r.stdout and "changed" not in r.stdout
    for rel, data in files.items():
        assert read_file(m.path(rel)) == data
    assert set(versions(backing, list(files)).values()) == {"2"}
    m.umount()
    m = mount(backing=backing)
    assert read_file(m.path("d/e/big")) == files["d/e/big"]


def test_rewrap_reports_damaged_and_foreign_files(local, mount, tmp_path):
    backing, ks = local
    m = mount(backing=backing)
    tree(m.mnt)
    m.umount()
    rotate_local(ks)
    # Both header slots of one file broken: it cannot be unwrapped, and is left alone.
    p = os.path.join(backing, "d", "b.bin")
    with open(p, "r+b") as f:
        raw = bytearray(f.read(HEADER_AREA))
        for s in (0, 1):
            raw[s * HEADER_SIZE + HEADER_SIZE - 1] ^= 0x01
        f.seek(0)
        f.write(raw)
    r = rewrap(backing)
    assert r.returncode == EXIT_DAMAGED, r
    assert r.stdout.splitlines() == [
        "damaged: d/b.bin: no header slot authenticates: left as it is (see keyfsctl fsck)",
        "rewrap: 5 files: 4 re-wrapped to key version 2, 0 already on it, 0 empty (no key yet), 1 damaged",
    ]
    assert bytes(raw) == open(p, "rb").read(HEADER_AREA)


def test_rewrap_refuses_locked_key_and_non_volume(local, tmp_path):
    backing, ks = local
    r = rewrap(str(tmp_path))
    assert r.returncode == 3
    assert "is not a keyfs volume (no .keyfs)" in r.stderr
    assert run([KEYFSCTL, "key", "suspend", "root", "--keystore", ks]).returncode == EXIT_OK
    r = rewrap(backing)
    assert r.returncode == EXIT_LOCKED
    assert "key 'root' is suspended" in r.stderr
    r = run([KEYFSCTL, "rewrap"])
    assert r.returncode == 2


# ---- Key Protect (emulated): the service re-wraps on unwrap ----

@pytest.fixture
def kpvol(emu, tmp_path, kp_client_env, apikey_file):
    # Fast client retries, so a failing service is given up on in well under a second.
    apikey = apikey_file
    backing = str(tmp_path / "backing")
    r = init_keyprotect(emu, backing, apikey)
    assert r.returncode == EXIT_OK, r
    return backing, apikey


def newest_version(emu):
    with emu.lock:
        return emu.keys[emu.kid].versions[-1]["id"]


def test_rewrap_keyprotect_rotation_interrupted_and_rerun(emu, kpvol, mount):
    backing, apikey = kpvol
    m = mount(backing=backing, opts=["apikey_file=" + apikey, "dek_pool=0"])
    files = {"f%02d" % i: os.urandom(100 + 997 * i) for i in range(12)}
    for rel, data in files.items():
        write_file(m.path(rel), data)
    m.umount()
    old = newest_version(emu)
    assert set(versions(backing, files).values()) == {old}
    before = {rel: backing_state(backing, rel) for rel in files}

    emu.key_action(emu.kid, "rotate")
    new = newest_version(emu)
    assert new != old

    # The service fails every unwrap after the fifth: the run stops, what it did is kept.
    emu.add_fault("status", status=503, match="/actions/unwrap", skip=5, count=-1)
    r = rewrap(backing, "--apikey-file", apikey)
    assert r.returncode == EXIT_KMS, r
    assert "rewrap: stopped after 6 files (5 re-wrapped); run it again once the key service answers" in r.stdout
    got = versions(backing, files)
    assert sorted(got.values()) == sorted([new] * 5 + [old] * 7)

    emu.clear_faults()
    unwraps = len(emu.requests(path="/actions/unwrap"))
    r = rewrap(backing, "--apikey-file", apikey)
    assert r.returncode == EXIT_OK, r
    assert r.stdout == "rewrap: 12 files: 7 re-wrapped to key version %s, 5 already on it, 0 empty (no key yet)\n" % new
    # One unwrap per file still on the old version (the service re-wraps it in the answer),
    # none for the files already done.
    assert len(emu.requests(path="/actions/unwrap")) - unwraps == 7
    assert versions(backing, files) == {rel: new for rel in files}
    for rel in files:
        assert backing_state(backing, rel)[1] == before[rel][1]

    m = mount(backing=backing, opts=["apikey_file=" + apikey])
    for rel, data in files.items():
        assert read_file(m.path(rel)) == data


def test_rewrap_keyprotect_needs_api_key(kpvol, monkeypatch):
    backing, apikey = kpvol
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    r = rewrap(backing)
    assert r.returncode == EXIT_KMS
    assert "uses Key Protect: give --apikey-file FILE" in r.stderr
    # systemd's credentials dir works as well.
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", os.path.dirname(apikey))
    r = rewrap(backing)
    assert r.returncode == EXIT_OK, r


# ---- the old wrapping leaves the file; only a slot that authenticates counts ----

def slot_raw(backing, rel, slot):
    with open(os.path.join(backing, rel), "rb") as f:
        f.seek(slot * HEADER_SIZE)
        return f.read(HEADER_SIZE)


def wrapped_of(raw):
    """The wrapped DEK of a header slot (docs/FORMAT.md: Lk at 32, Lv at 33, Lw at 34, from 40)."""
    lk, lv, lw = raw[32], raw[33], raw[34] | raw[35] << 8
    return raw[40 + lk + lv:40 + lk + lv + lw]


def forge_newest(backing, rel):
    """Slot 1 := slot 0 with generation 0xFFFFFFFF: it parses, names itself the newest, and does
    not authenticate (the tag covers the generation). A backing-dir writer can do this."""
    raw = bytearray(slot_raw(backing, rel, 0))
    struct.pack_into("<I", raw, GEN_OFFSET, 0xFFFFFFFF)
    with open(os.path.join(backing, rel), "r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(bytes(raw))


def fsck_clean(backing, *extra):
    r = run([KEYFSCTL, "fsck", backing, *extra])
    assert r.returncode == EXIT_OK, r
    # One line, the summary: no note about a second slot, nothing damaged.
    assert len(r.stdout.splitlines()) == 1 and ": 0 damaged, 0 not checked" in r.stdout, r.stdout


def test_rewrap_leaves_no_old_wrapped_key(local, mount):
    backing, ks = local
    m = mount(backing=backing)
    files = tree(m.mnt)
    m.umount()
    slot0 = {rel: slot_raw(backing, rel, 0) for rel in files}
    old = {rel: wrapped_of(raw) for rel, raw in slot0.items()}
    assert all(len(w) == 77 for w in old.values())
    rotate_local(ks)
    r = rewrap(backing)
    assert r.returncode == EXIT_OK, r
    for rel in files:
        data = read_file(os.path.join(backing, rel))
        assert old[rel] not in data, rel
        assert data[:HEADER_SIZE] == bytes(HEADER_SIZE), rel        # slot 0: unused
    fsck_clean(backing)

    # A stale slot left behind (a crash between the new header and the clear, or a file
    # re-wrapped by an older keyfs) is cleared by the next run, which re-wraps nothing.
    p = os.path.join(backing, "d/e/c.bin")
    with open(p, "r+b") as f:
        f.write(slot0["d/e/c.bin"])
    assert backing_state(backing, "d/e/c.bin")[0] == [1, 2]
    r = rewrap(backing)
    assert r.returncode == EXIT_OK, r
    assert r.stdout == "rewrap: 5 files: 0 re-wrapped to key version 2, 5 already on it, 0 empty (no key yet)\n"
    assert old["d/e/c.bin"] not in read_file(p)
    assert backing_state(backing, "d/e/c.bin")[0] == [0, 2]
    fsck_clean(backing)
    m = mount(backing=backing)
    for rel, data in files.items():
        assert read_file(m.path(rel)) == data


def test_rewrap_ignores_a_forged_newest_slot(local, mount):
    backing, ks = local
    m = mount(backing=backing)
    data = os.urandom(5000)
    write_file(m.path("f"), data)
    m.umount()
    forge_newest(backing, "f")
    rotate_local(ks)
    # Only the slot that authenticates decides the next generation and where it goes: the
    # forged one is overwritten by the new header, and the old one cleared.
    r = rewrap(backing)
    assert r.returncode == EXIT_OK, r
    assert r.stdout == "rewrap: 1 files: 1 re-wrapped to key version 2, 0 already on it, 0 empty (no key yet)\n"
    assert backing_state(backing, "f")[0] == [0, 2]
    assert versions(backing, ["f"]) == {"f": "2"}
    fsck_clean(backing)
    m = mount(backing=backing)
    assert read_file(m.path("f")) == data


def test_mount_rewrap_at_open_clears_old_slot_and_ignores_forged_one(emu, kpvol, mount):
    backing, apikey = kpvol
    opts = ["apikey_file=" + apikey, "dek_pool=0", "prefetch=0"]
    # The forged slot makes the daemon log that it does not authenticate.
    m = mount(backing=backing, opts=opts, allow_errors=True)
    files = {"plain": os.urandom(9000), "forged": os.urandom(300)}
    for rel, data in files.items():
        write_file(m.path(rel), data)
    m.umount()
    old = {rel: wrapped_of(slot_raw(backing, rel, 0)) for rel in files}
    forge_newest(backing, "forged")
    emu.key_action(emu.kid, "rotate")
    new = newest_version(emu)

    # The first open after the rotation stores the DEK the service re-wrapped.
    m.start()
    for rel, data in files.items():
        assert read_file(m.path(rel)) == data
    m.umount()
    assert versions(backing, files) == {rel: new for rel in files}
    for rel in files:
        assert backing_state(backing, rel)[0] == [0, 2], rel
        assert old[rel] not in read_file(os.path.join(backing, rel)), rel
    fsck_clean(backing, "--apikey-file", apikey)
    m.start()
    for rel, data in files.items():
        assert read_file(m.path(rel)) == data
