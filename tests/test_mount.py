# test_mount.py: mount options, relative paths, background and fstab-style mounts, signals
import errno
import os
import shutil
import signal
import subprocess

import pytest

from helpers import (FUSERMOUNT, KEYFS, expect_errno, is_mounted, proc_mounts_entry, read_file, run,
                     wait_for, write_file)

# Starts keyfs to mount without the mount fixture: needs /dev/fuse (conftest.py).
pytestmark = pytest.mark.fuse


def _mount_options(mnt):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                return set(fields[5].split(","))
    return None


def test_ro(mount, volume):
    m = mount()
    write_file(m.path("f"), b"content")
    m.umount()
    m.opts = ["ro"]
    m.start()
    assert "ro" in _mount_options(m.mnt)
    assert read_file(m.path("f")) == b"content"
    expect_errno(errno.EROFS, os.open, m.path("f"), os.O_WRONLY)
    expect_errno(errno.EROFS, os.open, m.path("g"), os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.EROFS, os.mkdir, m.path("d"))
    expect_errno(errno.EROFS, os.unlink, m.path("f"))
    expect_errno(errno.EROFS, os.truncate, m.path("f"), 0)


def test_passthrough_options_visible(mount):
    m = mount(opts=["noexec", "nosuid", "nodev", "noatime"])
    opts = _mount_options(m.mnt)
    assert {"noexec", "nosuid", "nodev", "noatime"} <= opts, opts
    write_file(m.path("f"), b"#!/bin/sh\necho hi\n")
    os.chmod(m.path("f"), 0o755)
    expect_errno(errno.EACCES, subprocess.run, [m.path("f")])


def test_exec_allowed_by_default(mount):
    m = mount(opts=["exec"])
    write_file(m.path("script"), b"#!/bin/sh\necho hi from keyfs\n")
    os.chmod(m.path("script"), 0o755)
    r = run([m.path("script")])
    assert r.returncode == 0 and r.stdout == "hi from keyfs\n"


def test_fstab_only_options_ignored(mount):
    m = mount(opts=["defaults", "nofail", "_netdev", "auto", "noauto", "nouser", "users", "owner", "group",
                    "comment=systemd.automount", "x-systemd.requires=network.target", "user"])
    write_file(m.path("f"), b"fstab")
    assert read_file(m.path("f")) == b"fstab"
    assert proc_mounts_entry(m.mnt)[1] == "fuse.keyfs"


def test_atime_policy_options_accepted(mount):
    m = mount(opts=["relatime", "strictatime", "diratime", "nodiratime", "sync", "dirsync", "async", "rw"])
    write_file(m.path("f"), b"x")
    assert read_file(m.path("f")) == b"x"


def test_keystore_override(mount, volume, keystore, tmp_path):
    moved = str(tmp_path / "moved-keystore")
    shutil.move(keystore, moved)
    m = mount(opts=["keystore=" + moved])
    write_file(m.path("f"), b"with the moved keystore")
    m.remount()
    assert read_file(m.path("f")) == b"with the moved keystore"


def test_relative_paths(mount, volume, tmp_path):
    os.mkdir(str(tmp_path / "relmnt"))
    m = mount(backing="backing", mnt="relmnt", cwd=str(tmp_path))
    assert m.mnt == str(tmp_path / "relmnt")
    assert proc_mounts_entry(m.mnt) == (volume, "fuse.keyfs")
    write_file(m.path("f"), b"relative")
    m.remount()
    assert read_file(m.path("f")) == b"relative"
    assert os.path.exists(os.path.join(volume, "f"))


def test_debug_flag(mount):
    m = mount(extra_args=["-d"], allow_errors=True)
    write_file(m.path("f"), b"debug")
    assert read_file(m.path("f")) == b"debug"
    m.umount()
    log = "".join(read_file(p).decode(errors="replace") for p in m.logs)
    assert "unique" in log, log[:2000]


def test_sigterm_unmounts(mount):
    m = mount()
    write_file(m.path("f"), b"before sigterm")
    proc = m.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not is_mounted(m.mnt)
    m.proc = None
    m.start()
    assert read_file(m.path("f")) == b"before sigterm"


def test_auto_unmount_after_kill(mount):
    m = mount(opts=["auto_unmount"])
    write_file(m.path("f"), b"x")
    proc = m.proc
    proc.kill()
    proc.wait(timeout=10)
    m.proc = None
    try:
        wait_for(lambda: not is_mounted(m.mnt), timeout=10, what="auto_unmount to remove the mount")
    finally:
        if is_mounted(m.mnt):
            # The test fails; the fixture no longer owns a daemon here, so it would leave this dead
            # mount behind: lazily unmount our own mountpoint.
            m._fusermount("-z")
    m.start()
    assert read_file(m.path("f")) == b"x"


def _daemon_pids(mnt):
    """Pids of keyfs processes whose command line names our (unique) mountpoint."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"keyfs" and os.fsencode(mnt) in argv:
            pids.append(int(d))
    return pids


def _cleanup_background(mnt):
    pids = _daemon_pids(mnt)
    if is_mounted(mnt):
        subprocess.run([FUSERMOUNT, "-u", mnt])
    for pid in pids:
        wait_for(lambda: not os.path.exists("/proc/%d" % pid), timeout=10,
                 what="background keyfs %d to exit" % pid)


def test_background_mount(volume, tmp_path):
    mnt = str(tmp_path / "bg")
    os.mkdir(mnt)
    try:
        r = run([KEYFS, volume, mnt], timeout=20)
        assert r.returncode == 0, r.stderr
        assert is_mounted(mnt)
        pids = _daemon_pids(mnt)
        assert len(pids) == 1, pids
        write_file(os.path.join(mnt, "f"), b"daemonized")
        assert read_file(os.path.join(mnt, "f")) == b"daemonized"
        r = subprocess.run([FUSERMOUNT, "-u", mnt])
        assert r.returncode == 0
        wait_for(lambda: not os.path.exists("/proc/%d" % pids[0]), timeout=10, what="daemon exit")
    finally:
        _cleanup_background(mnt)


def test_fstab_style_mount_helper(volume, tmp_path):
    helper = shutil.which("mount.fuse3", path="/sbin:/usr/sbin:/bin:/usr/bin")
    if helper is None:
        pytest.skip("mount.fuse3 missing")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    mnt = str(tmp_path / "fstab")
    os.mkdir(mnt)
    env = dict(os.environ, PATH=os.path.dirname(KEYFS) + ":" + os.environ.get("PATH", "/usr/bin:/bin"))
    try:
        # What mount(8) runs for an fstab line "BACKING MNT fuse.keyfs nofail,... 0 0"
        # (mount(8) itself resets PATH, so call its helper directly).
        r = run([helper, volume, mnt, "-t", "keyfs", "-o", "nofail,_netdev,noatime,x-systemd.automount"],
                env=env, timeout=20)
        assert r.returncode == 0, r.stderr
        assert proc_mounts_entry(mnt) == (volume, "fuse.keyfs")
        write_file(os.path.join(mnt, "f"), b"via mount(8)")
        assert read_file(os.path.join(mnt, "f")) == b"via mount(8)"
    finally:
        _cleanup_background(mnt)
    assert not is_mounted(mnt)


def test_second_keyfs_on_a_live_mount_is_refused(mount, volume, tmp_path):
    m = mount()
    write_file(m.path("f"), b"first")
    other = str(tmp_path / "other")
    r = run([os.path.join(os.path.dirname(os.path.dirname(KEYFS)), "cli", "keyfsctl"), "init", other, "--kms",
             "local", "--keystore", str(tmp_path / "keystore"), "--key", "test"])
    assert r.returncode == 0, r
    for extra in ([], ["-o", "nonempty"]):
        r = run([KEYFS, other, m.mnt, "-f", *extra], timeout=20)
        assert r.returncode == 5, r
        assert "mountpoint '%s' is already a keyfs mount (of '%s')" % (m.mnt, volume) in r.stderr
    # The first mount is untouched and still answers.
    assert read_file(m.path("f")) == b"first"


def _start_foreground(backing, mnt):
    proc = subprocess.Popen([KEYFS, backing, mnt, "-f"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: proc.poll() is not None or (os.path.ismount(mnt) and is_mounted(mnt)), timeout=10,
             what="keyfs to mount %s" % mnt)
    assert proc.poll() is None, proc.communicate()
    return proc


def _stop_foreground(proc, mnt):
    if proc.poll() is None:
        if is_mounted(mnt):
            subprocess.run([FUSERMOUNT, "-u", mnt])
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if is_mounted(mnt):
        subprocess.run([FUSERMOUNT, "-u", "-z", mnt])


def test_restart_after_a_crash_removes_its_dead_mount(volume, tmp_path):
    """What systemd's Restart=on-failure relies on: a daemon killed with SIGKILL leaves a dead
    mount, and the next start on the same backing dir clears it instead of failing on it."""
    mnt = str(tmp_path / "m")
    os.mkdir(mnt)
    proc = _start_foreground(volume, mnt)
    try:
        write_file(os.path.join(mnt, "f"), b"before the crash")
        proc.kill()
        proc.wait(timeout=10)
        expect_errno(errno.ENOTCONN, os.stat, mnt)
        proc = _start_foreground(volume, mnt)
        assert read_file(os.path.join(mnt, "f")) == b"before the crash"
    finally:
        _stop_foreground(proc, mnt)
    err = proc.stderr.read()
    assert "mountpoint '%s' held a dead keyfs mount of '%s' (its daemon died): removed it" % (mnt, volume) in err
    assert not is_mounted(mnt)


def test_dead_mount_of_another_volume_is_left_alone(volume, tmp_path):
    other = str(tmp_path / "other")
    r = run([os.path.join(os.path.dirname(os.path.dirname(KEYFS)), "cli", "keyfsctl"), "init", other, "--kms",
             "local", "--keystore", str(tmp_path / "keystore"), "--key", "test"])
    assert r.returncode == 0, r
    mnt = str(tmp_path / "m")
    os.mkdir(mnt)
    proc = _start_foreground(other, mnt)
    try:
        proc.kill()
        proc.wait(timeout=10)
        r = run([KEYFS, volume, mnt, "-f"], timeout=20)
        assert r.returncode == 5, r
        assert "mountpoint '%s' is a dead FUSE mount (fuse.keyfs, of '%s'): unmount it with 'fusermount3 -uz %s'" % (mnt, other, mnt) in r.stderr
        assert is_mounted(mnt)
    finally:
        _stop_foreground(proc, mnt)


def test_one_mount_per_volume(mount, volume, tmp_path):
    """Two daemons on one backing dir would each rewrite partial chunks of the same files
    unaware of the other: the second is refused, in the foreground and in the background."""
    m = mount()
    write_file(m.path("f"), b"only one")
    other = str(tmp_path / "other-mnt")
    os.mkdir(other)
    for extra in (["-f"], []):
        r = run([KEYFS, volume, other, *extra], timeout=20)
        assert r.returncode == 5, r
        assert r.stderr == ("keyfs: error: volume '%s' is already mounted by another keyfs (see 'findmnt -t "
                            "fuse.keyfs'): one mount per volume unless every mount is shared (-o shared)\n" % volume)
        assert not is_mounted(other)
    m.umount()
    # Once the first is gone, the volume mounts anywhere again.
    m2 = mount(mnt=other)
    assert read_file(m2.path("f")) == b"only one"


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount's read_ahead_kb is root's to raise")
def test_readahead_is_one_full_request(mount):
    # The kernel starts a FUSE mount at 128 KiB of readahead and INIT can only lower it: the
    # daemon, as root, raises it to 1 MiB, one READ of 256 pages, so sequential reads come in
    # 1 MiB requests rather than 128 KiB ones.
    m = mount()
    dev = os.stat(m.mnt).st_dev
    with open("/sys/class/bdi/%d:%d/read_ahead_kb" % (os.major(dev), os.minor(dev))) as f:
        assert f.read().strip() == "1024"
    data = os.urandom(3 * 1024 * 1024 + 4095)
    write_file(m.path("f"), data)
    assert read_file(m.path("f")) == data
