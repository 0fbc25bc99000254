# test_keystore.py: the local keystore really shreds (issue 9 point 5): no key material left on disk
# after suspend, enable, rotate and destroy; a key material file zeroed in place locks at once.
#
# The tests read the key material from the keystore's files themselves (docs/FORMAT.md, "The local
# keystore"): NAME.vN.material files (112 bytes, material at offset 48), and for keystores written
# by an earlier keyfs (format 1) the "version=N BASE64" lines of NAME.key, so they also measure the old layout.
import base64
import errno
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest

from helpers import (EXIT_LOCKED, EXIT_KMS, EXIT_OK, KEYFSCTL, MAT_MAGIC, MAT_OFF, MAT_SIZE, expect_errno, key_show,
                     keyfsctl, materials, read_file, run, write_file)

def encodings(material):
    """Every form a key file could hold material in: raw, base64 (its unpadded prefix, so a copy with
    or without '=' counts once), hex."""
    return [material, base64.b64encode(material).rstrip(b"="), material.hex().encode(),
            material.hex().upper().encode()]


def count_in_image(image, mats):
    """How many times any encoding of any material occurs in the image file."""
    with open(image, "rb") as f:
        data = f.read()
    return sum(data.count(e) for m in mats for e in encodings(m))


class LoopExt4:
    """A 64 MiB ext4 image, loop-mounted on a temp dir; always unmounted and detached."""

    def __init__(self, tmp_path):
        self.image = str(tmp_path / "ks.img")
        self.mnt = str(tmp_path / "ksmnt")
        self.mounted = False

    def __enter__(self):
        if os.geteuid() != 0:
            pytest.skip("needs root: loop-mounting an ext4 image")
        for tool in ("mkfs.ext4", "mount", "umount", "losetup"):
            if shutil.which(tool) is None:
                pytest.skip("%s is missing (e2fsprogs, util-linux)" % tool)
        with open(self.image, "wb") as f:
            f.truncate(64 << 20)
        r = run(["mkfs.ext4", "-q", "-F", self.image])
        assert r.returncode == 0, r
        os.mkdir(self.mnt)
        r = run(["mount", "-t", "ext4", "-o", "loop,data=ordered", self.image, self.mnt])
        if r.returncode != 0:
            pytest.skip("cannot loop-mount an ext4 image here (no loop devices?): %s" % r.stderr.strip())
        self.mounted = True
        return self

    def sync(self):
        fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.syncfs(fd) if hasattr(os, "syncfs") else os.sync()
        finally:
            os.close(fd)
        os.sync()

    def umount(self):
        if self.mounted:
            r = run(["umount", self.mnt])
            assert r.returncode == 0, r
            self.mounted = False
        self.detach()

    def detach(self):
        # mount -o loop sets autoclear; detach explicitly in case it did not.
        r = run(["losetup", "-j", self.image])
        for line in r.stdout.splitlines():
            dev = line.split(":", 1)[0]
            if dev.startswith("/dev/loop"):
                run(["losetup", "-d", dev])

    def __exit__(self, *exc):
        if self.mounted:
            r = run(["umount", self.mnt])
            if r.returncode != 0:
                run(["umount", "-l", self.mnt])
            self.mounted = False
        self.detach()
        return False


def test_destroy_leaves_no_material_on_ext4_image(tmp_path):
    """create, suspend, enable, rotate, destroy on a loop-mounted ext4: afterwards the whole image
    holds no copy of any version's material, in any encoding."""
    with LoopExt4(tmp_path) as fs:
        ks = os.path.join(fs.mnt, "keystore")
        keyfsctl("key", "create", "shred", "--keystore", ks)
        key_id = key_show(ks, "shred")[1]["id"]
        v1 = materials(ks, "shred")
        assert list(v1) == [1], v1
        keyfsctl("key", "suspend", "shred", "--keystore", ks)
        keyfsctl("key", "enable", "shred", "--keystore", ks)
        keyfsctl("key", "rotate", "shred", "--keystore", ks)
        both = materials(ks, "shred")
        assert sorted(both) == [1, 2] and both[1] == v1[1], both
        mats = list(both.values())
        # The scan sees material that is there: both versions are on the image before destroy.
        fs.sync()
        before = count_in_image(fs.image, mats)
        assert before >= 2, "the scan found %d copies of live material" % before
        r = keyfsctl("key", "destroy", "shred", "--keystore", ks)
        assert materials(ks, "shred") == {}
        listing = sorted(os.listdir(ks))
        fs.umount()
        left = count_in_image(fs.image, mats)
        print("copies of key material on the image: %d before destroy, %d after" % (before, left))
        assert left == 0, "%d copies of key material survived destroy on the image" % left
        assert listing == ["shred.key"], listing
        assert r.stdout.splitlines()[0] == (
            "destroyed key 'shred' (id %s): the only copy of its material (2 versions) was overwritten in place "
            "with random bytes, flushed to disk and removed" % key_id), r.stdout


def status(mnt):
    r = run([KEYFSCTL, "status", mnt, "--json"])
    assert r.stderr == "", r
    return r.returncode, json.loads(r.stdout)


def wait_locked(mnt, timeout):
    deadline = time.monotonic() + timeout
    while True:
        rc, doc = status(mnt)
        if doc["state"] == "locked":
            return rc, doc
        if time.monotonic() > deadline:
            raise AssertionError("%s still %s %.0f s after the material was zeroed: %r" % (mnt, doc["state"], timeout, doc))
        time.sleep(0.02)


def zero_in_place(path):
    """What `shred -n0 -z` (without -u) leaves: same file, same length, all zeros, on disk."""
    size = os.stat(path).st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\0" * size, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("which", ["material", "every-file"])
def test_zeroed_key_file_locks_as_destroyed_without_grace(volume, keystore, mount, which):
    """A key file zeroed in place is a destroyed key, not a keystore outage: with poll=1 and a
    one-hour grace the mount locks as key-destroyed (EKEYREVOKED) at its next poll."""
    data = b"protected by the local key\n" * 50
    m = mount(backing=volume, opts=("poll=1", "grace=3600"), allow_errors=True)
    write_file(m.path("f"), data)
    assert read_file(m.path("f")) == data
    rc, doc = status(m.mnt)
    assert (rc, doc["state"]) == (EXIT_OK, "unlocked"), doc
    if which == "material":
        files = glob.glob(os.path.join(keystore, "test.v*.material")) or [os.path.join(keystore, "test.key")]
    else:
        files = [os.path.join(keystore, n) for n in os.listdir(keystore)]
    for path in files:
        zero_in_place(path)
    t0 = time.monotonic()
    rc, doc = wait_locked(m.mnt, timeout=1.1 + 1.0 + 1.0)
    took = time.monotonic() - t0
    assert (rc, doc["state"], doc["reason"], doc["key_state"]) == (EXIT_LOCKED, "locked", "key-destroyed", 5), doc
    expect_errno(errno.EKEYREVOKED, read_file, m.path("f"))
    expect_errno(errno.EKEYREVOKED, write_file, m.path("new"), b"x")
    assert "destroyed" in m.stderr(), m.stderr()
    print("zeroed %s -> locked in %.2f s (poll 1 s, grace 3600 s)" % (which, took))


def test_destroy_message_and_show_of_a_half_destroyed_key(keystore):
    """A material file zeroed in place: key show says destroyed and why, suspend refuses, and
    destroy finishes the job."""
    keyfsctl("key", "create", "half", "--keystore", keystore)
    zero_in_place(os.path.join(keystore, "half.v1.material"))
    r = keyfsctl("key", "show", "half", "--keystore", keystore)
    lines = r.stdout.splitlines()
    assert "state: destroyed (5)" in lines, r.stdout
    assert lines[-1] == ("note: key material file '%s/half.v1.material' is damaged (it is all zeros): the key counts "
                         "as destroyed; finish with 'keyfsctl key destroy half'" % keystore), r.stdout
    r = run([KEYFSCTL, "key", "suspend", "half", "--keystore", keystore])
    assert r.returncode == EXIT_LOCKED and "finish the destroy" in r.stderr, r
    r = keyfsctl("key", "destroy", "half", "--keystore", keystore)
    assert "(1 version) was overwritten in place" in r.stdout, r.stdout
    assert sorted(os.listdir(keystore)) == ["half.key"]
    r = run([KEYFSCTL, "key", "destroy", "half", "--keystore", keystore])
    assert r.returncode == EXIT_LOCKED and "already destroyed" in r.stderr, r


def test_format1_keystore_migrates_on_first_change(tmp_path, mount):
    """A keystore an earlier keyfs wrote (material inline in NAME.key) mounts as before; its first
    change moves the material into material files, unchanged, and leaves none in NAME.key."""
    from test_fixtures import copy_fixture
    vol = str(tmp_path / "v1")
    manifest = copy_fixture("v1", vol)
    ks = os.path.join(vol, "keystore")
    old = materials(ks, "fixture")
    assert list(old) == [1]
    keyfsctl("key", "rotate", "fixture", "--keystore", ks)
    assert sorted(os.listdir(ks)) == ["fixture.key", "fixture.v1.material", "fixture.v2.material"]
    text = read_file(os.path.join(ks, "fixture.key"))
    assert b"version=" not in text and b"versions=2\n" in text, text
    now = materials(ks, "fixture")
    assert now[1] == old[1] and len(now) == 2
    # A volume from elsewhere, as a user would bring it: trusted once, then mounted.
    keyfsctl("trust", "--yes", os.path.join(vol, "backing"))
    m = mount(backing=os.path.join(vol, "backing"), opts=("keystore=" + ks,))
    name, want = next((n, w) for n, w in manifest["files"].items() if "sha256" in w and w["size"])
    import hashlib
    assert hashlib.sha256(read_file(m.path(name))).hexdigest() == want["sha256"], name
