# test_errors.py: every refused start gives the documented exit code, a clear message and no mount
import errno
import os
import shutil
import subprocess

import pytest

from helpers import (EXIT_CONFIG, EXIT_EXISTS, EXIT_KMS, EXIT_LOCKED, EXIT_MOUNT, EXIT_USAGE, FUSERMOUNT,
                     FORMAT, KEYFS, KEYFSCTL, is_mounted, keyfsctl, read_file, run, wait_for, write_file)

# Starts keyfs to mount without the mount fixture: needs /dev/fuse (conftest.py).
pytestmark = pytest.mark.fuse


def keyfs_fails(argv, code, mentions, mnt=None, foreground=True):
    """Run keyfs expecting it to exit with `code`; check stderr and that nothing got mounted."""
    if foreground:
        argv = argv + ["-f"]
    proc = subprocess.Popen([KEYFS] + argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        # It mounted (or hung) instead of failing: clean up what is ours, then fail.
        if mnt and is_mounted(mnt):
            subprocess.run([FUSERMOUNT, "-u", mnt])
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail("keyfs %s did not exit (expected %d)\nstderr:\n%s" % (argv, code, err), pytrace=False)
    leftover = mnt is not None and is_mounted(mnt)
    if leftover:
        subprocess.run([FUSERMOUNT, "-u", mnt])
    assert not leftover, "keyfs %s left %s mounted (rc %d)\nstderr: %s" % (argv, mnt, proc.returncode, err)
    assert proc.returncode == code, "keyfs %s: exit %d, expected %d\nstderr: %s" % (argv, proc.returncode, code, err)
    assert err.strip(), "no message on stderr"
    for m in mentions:
        assert m in err, "stderr does not mention %r:\n%s" % (m, err)
    assert "Traceback" not in err and "Segmentation" not in err
    return err


@pytest.fixture
def mp(tmp_path):
    d = str(tmp_path / "mp")
    os.mkdir(d)
    return d


FG_BG = pytest.mark.parametrize("fg", [True, False], ids=["fg", "bg"])


def test_bogus_option(volume, mp):
    err = keyfs_fails([volume, mp, "-o", "bogus"], EXIT_USAGE, ["bogus"], mnt=mp)
    assert "unknown mount option 'bogus'" in err


def test_bogus_option_among_good_ones(volume, mp):
    keyfs_fails([volume, mp, "-o", "noatime,frobnicate=1,nodev"], EXIT_USAGE, ["frobnicate"], mnt=mp)


def test_bogus_flag(volume, mp):
    keyfs_fails([volume, mp, "--no-such-flag"], EXIT_USAGE, ["--no-such-flag"], mnt=mp)


@pytest.mark.parametrize("args", [[], ["only-one"]], ids=["none", "one"])
def test_missing_args(args):
    r = run([KEYFS] + args)
    assert r.returncode == EXIT_USAGE, r.stderr
    assert r.stderr.strip()


def test_too_many_args(volume, mp, tmp_path):
    keyfs_fails([volume, mp, str(tmp_path)], EXIT_USAGE, [], mnt=mp)


@FG_BG
def test_missing_backing(tmp_path, mp, fg):
    b = str(tmp_path / "nope")
    keyfs_fails([b, mp], EXIT_CONFIG, [b], mnt=mp, foreground=fg)


@FG_BG
def test_backing_not_a_volume(tmp_path, mp, fg):
    b = str(tmp_path / "plain")
    os.mkdir(b)
    write_file(os.path.join(b, "somefile"), b"x")
    keyfs_fails([b, mp], EXIT_CONFIG, [b], mnt=mp, foreground=fg)


def test_backing_is_a_file(tmp_path, mp):
    b = str(tmp_path / "file")
    write_file(b, b"x")
    keyfs_fails([b, mp], EXIT_CONFIG, [b], mnt=mp)


@pytest.mark.parametrize("content", [
    b"\x00\x01garbage\xff\n",
    b"format=1\nno equals sign here\n",
    b"format=1\nunknown_field=1\n",
    b"",
], ids=["binary", "syntax", "unknown-field", "empty"])
def test_corrupt_voldesc(volume, mp, content):
    write_file(os.path.join(volume, ".keyfs"), content)
    keyfs_fails([volume, mp], EXIT_CONFIG, [volume], mnt=mp)


def test_voldesc_newer_format(volume, mp):
    p = os.path.join(volume, ".keyfs")
    with open(p) as f:
        text = f.read()
    write_file(p, text.replace("format=%d" % FORMAT, "format=3").encode())
    keyfs_fails([volume, mp], EXIT_CONFIG, [volume], mnt=mp)


def test_missing_mountpoint(volume, tmp_path):
    m = str(tmp_path / "no-mnt")
    keyfs_fails([volume, m], EXIT_MOUNT, [m])
    assert not os.path.exists(m)


def test_mountpoint_is_a_file(volume, tmp_path):
    m = str(tmp_path / "file-mnt")
    write_file(m, b"")
    keyfs_fails([volume, m], EXIT_MOUNT, [m])


@FG_BG
def test_nonempty_mountpoint(volume, mp, fg):
    write_file(os.path.join(mp, "occupant"), b"x")
    keyfs_fails([volume, mp], EXIT_MOUNT, [mp], mnt=mp, foreground=fg)


def test_nonempty_mountpoint_allowed(volume, mp, mount):
    write_file(os.path.join(mp, "occupant"), b"x")
    m = mount(backing=volume, mnt=mp, opts=["nonempty"])
    assert os.listdir(m.mnt) == []
    write_file(m.path("inside"), b"y")
    m.umount()
    assert os.listdir(mp) == ["occupant"]


def test_key_file_removed(volume, keystore, mp):
    os.unlink(os.path.join(keystore, "test.key"))
    keyfs_fails([volume, mp], EXIT_KMS, ["test"], mnt=mp)


def test_keystore_is_a_file(volume, keystore, mp):
    shutil.rmtree(keystore)
    write_file(keystore, b"not a dir")
    keyfs_fails([volume, mp], EXIT_KMS, [keystore], mnt=mp)


def test_keystore_override_missing(volume, tmp_path, mp):
    k = str(tmp_path / "other-keystore")
    keyfs_fails([volume, mp, "-o", "keystore=" + k], EXIT_KMS, [k], mnt=mp)


def _volume_with_file(mount, volume, data):
    m = mount(backing=volume)
    write_file(m.path("f"), data)
    m.umount()


def test_key_suspended_mounts_locked_then_unlocks(volume, keystore, mount):
    """A suspended key: the volume mounts locked (metadata visible, contents ENOKEY), and
    unlocks by itself once the key is enabled (docs/LOCKING.md)."""
    data = b"written while the key was active\n" * 100
    _volume_with_file(mount, volume, data)
    keyfsctl("key", "suspend", "test", "--keystore", keystore)
    m = mount(backing=volume, opts=("poll=1",), allow_errors=True)
    assert "suspended: mounting locked" in m.stderr()
    assert os.listdir(m.path()) == ["f"]
    assert os.stat(m.path("f")).st_size == len(data)
    with pytest.raises(OSError) as e:
        open(m.path("f"), "rb")
    assert e.value.errno == errno.ENOKEY
    with pytest.raises(OSError) as e:
        open(m.path("new"), "wb")
    assert e.value.errno == errno.ENOKEY
    keyfsctl("key", "enable", "test", "--keystore", keystore)

    def readable():
        try:
            return read_file(m.path("f")) == data
        except OSError as err:
            assert err.errno == errno.ENOKEY
            return False
    wait_for(readable, timeout=5, what="unlock after key enable")


def test_key_destroyed_mounts_locked(volume, keystore, mount):
    data = b"shredded\n" * 10
    _volume_with_file(mount, volume, data)
    keyfsctl("key", "destroy", "test", "--keystore", keystore)
    m = mount(backing=volume, allow_errors=True)
    assert "destroyed: mounting locked" in m.stderr()
    assert os.stat(m.path("f")).st_size == len(data)
    with pytest.raises(OSError) as e:
        open(m.path("f"), "rb")
    assert e.value.errno == errno.EKEYREVOKED


# -- keyfsctl --------------------------------------------------------------------------------------

def ctl_fails(args, code, mentions=()):
    r = run([KEYFSCTL] + list(args))
    assert r.returncode == code, "keyfsctl %s: exit %d, expected %d\nstderr: %s" % (
        " ".join(args), r.returncode, code, r.stderr)
    assert r.stderr.strip(), "no message on stderr"
    for m in mentions:
        assert m in r.stderr, "stderr does not mention %r:\n%s" % (m, r.stderr)
    return r


def test_ctl_init_nonempty_dir(tmp_path, keystore):
    b = str(tmp_path / "b")
    os.mkdir(b)
    write_file(os.path.join(b, "data"), b"x")
    ctl_fails(["init", b, "--kms", "local", "--keystore", keystore, "--key", "k", "--create-key"],
              EXIT_EXISTS, [b])
    assert os.listdir(b) == ["data"]


def test_ctl_init_twice(volume, keystore):
    with open(os.path.join(volume, ".keyfs"), "rb") as f:
        before = f.read()
    ctl_fails(["init", volume, "--kms", "local", "--keystore", keystore, "--key", "test"], EXIT_EXISTS, [volume])
    with open(os.path.join(volume, ".keyfs"), "rb") as f:
        assert f.read() == before


def test_ctl_init_missing_key(tmp_path, keystore):
    keyfsctl("key", "create", "other", "--keystore", keystore)
    b = str(tmp_path / "b")
    ctl_fails(["init", b, "--kms", "local", "--keystore", keystore, "--key", "missing"], EXIT_KMS, ["missing"])
    assert not os.path.exists(os.path.join(b, ".keyfs"))


def test_ctl_init_create_existing_key(tmp_path, keystore):
    keyfsctl("key", "create", "k", "--keystore", keystore)
    b = str(tmp_path / "b")
    ctl_fails(["init", b, "--kms", "local", "--keystore", keystore, "--key", "k", "--create-key"],
              EXIT_EXISTS, ["k"])
    assert not os.path.exists(os.path.join(b, ".keyfs"))


def test_ctl_init_suspended_key(tmp_path, keystore):
    keyfsctl("key", "create", "k", "--keystore", keystore)
    keyfsctl("key", "suspend", "k", "--keystore", keystore)
    b = str(tmp_path / "b")
    r = run([KEYFSCTL, "init", b, "--kms", "local", "--keystore", keystore, "--key", "k"])
    assert r.returncode in (EXIT_KMS, EXIT_LOCKED), r.stderr
    assert not os.path.exists(os.path.join(b, ".keyfs"))


def test_ctl_unknown_subcommand():
    ctl_fails(["frobnicate"], EXIT_USAGE, ["frobnicate"])


def test_ctl_no_args():
    r = run([KEYFSCTL])
    assert r.returncode == EXIT_USAGE
    assert r.stderr.strip()


def test_ctl_init_bad_kms(tmp_path, keystore):
    ctl_fails(["init", str(tmp_path / "b"), "--kms", "nosuch", "--keystore", keystore], EXIT_USAGE, ["nosuch"])


def test_ctl_key_create_twice(keystore):
    keyfsctl("key", "create", "k", "--keystore", keystore)
    ctl_fails(["key", "create", "k", "--keystore", keystore], EXIT_EXISTS, ["k"])


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65, "sp ace"])
def test_ctl_bad_key_name(keystore, tmp_path, name):
    ctl_fails(["key", "create", name, "--keystore", keystore], EXIT_USAGE)
    assert not os.path.exists(str(tmp_path / "x.key"))
    assert not os.path.exists(os.path.join(keystore, "..", "x.key"))


def test_ctl_key_show_unknown(keystore):
    keyfsctl("key", "create", "k", "--keystore", keystore)
    ctl_fails(["key", "show", "nope", "--keystore", keystore], EXIT_KMS, ["nope"])


def test_ctl_inspect_not_keyfs(tmp_path):
    p = str(tmp_path / "plain.txt")
    write_file(p, b"just some text that is not a keyfs file" * 50)
    r = run([KEYFSCTL, "inspect", p])
    assert r.returncode != 0
    assert p in r.stderr


def test_ctl_inspect_missing(tmp_path):
    p = str(tmp_path / "missing")
    r = run([KEYFSCTL, "inspect", p])
    assert r.returncode != 0
    assert p in r.stderr
