# test_fstab.py: an /etc/fstab line "BACKING MNT fuse.keyfs OPTIONS 0 0" mounted by mount(8) itself, as at boot
#
# mount(8) runs /sbin/mount.fuse3, which runs "keyfs" through /bin/sh with the standard PATH,
# whatever the caller's PATH: keyfs must be installed there. Each test runs in a private mount
# namespace (unshare) where a temporary dir holding keyfs is bind-mounted over /usr/local/bin
# and a temporary fstab over /etc/fstab, so the real mount(8), mount.fuse3 and umount(8) run
# with neither the host's fstab nor its /usr/local/bin touched. The namespace, its mounts and
# the daemon end with the script.
import os
import shutil
import subprocess
import time

import pytest

from helpers import APIKEY, EXIT_OK, KEYFS, init_keyprotect, secret_file

# Starts keyfs to mount without the mount fixture: needs /dev/fuse (conftest.py).
pytestmark = pytest.mark.fuse

SCRIPT = r"""
set -eu
mnt=$1 bin=$2 fstab=$3
trap 'umount -l "$mnt" 2>/dev/null || true' EXIT
mount --make-rprivate /
mount --bind "$bin" /usr/local/bin
mount --bind "$fstab" /etc/fstab
mount "$mnt"
awk -v m="$mnt" '$5 == m { for (i = 7; $i != "-"; i++); print "MOUNTED", $(i+1), $(i+2); print "OPTIONS", $6 }' /proc/self/mountinfo
printf 'written through an fstab mount' > "$mnt/f"
echo "READ $(cat "$mnt/f")"
umount "$mnt"
trap - EXIT
awk -v m="$mnt" '$5 == m { print "STILL MOUNTED" }' /proc/self/mountinfo
echo DONE
"""


def need_mount_tools():
    if os.geteuid() != 0:
        pytest.skip("mounting from fstab needs root")
    missing = [t for t in ("unshare", "mount", "umount") if shutil.which(t) is None]
    if not os.path.exists("/sbin/mount.fuse3") and not os.path.exists("/usr/sbin/mount.fuse3"):
        missing.append("mount.fuse3 (package fuse3)")
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail("missing in CI: " + ", ".join(missing))
        pytest.skip("missing: " + ", ".join(missing))


def fstab_mount(tmp_path, backing, options):
    """Mount BACKING through a one-line fstab, write and read a file, unmount; returns the lines printed."""
    need_mount_tools()
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    bindir = tmp_path / "usr-local-bin"
    bindir.mkdir()
    os.symlink(KEYFS, str(bindir / "keyfs"))
    fstab = tmp_path / "fstab"
    fstab.write_text("# written by test_fstab.py\n%s %s fuse.keyfs %s 0 0\n" % (backing, mnt, options))
    r = subprocess.run(["unshare", "--mount", "bash", "-c", SCRIPT, "fstab-test", mnt, str(bindir), str(fstab)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=60)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    opts = [set(line.split()[1].split(",")) for line in lines if line.startswith("OPTIONS ")]
    return [line for line in lines if not line.startswith("OPTIONS ")], r.stderr, opts


def test_fstab_line_local_keystore(volume, keystore, tmp_path):
    out, err, opts = fstab_mount(tmp_path, volume,
                                 "keystore=%s,nosuid,nodev,nofail,_netdev,noatime,x-systemd.automount" % keystore)
    assert out == ["MOUNTED fuse.keyfs %s" % volume, "READ written through an fstab mount", "DONE"], err
    # The README's advice: mount.fuse3 would mount with suid and dev unless the line says not to.
    assert len(opts) == 1 and {"nosuid", "nodev", "noatime"} <= opts[0], opts
    # What was written is in the backing dir, encrypted.
    with open(os.path.join(volume, "f"), "rb") as f:
        assert b"written through" not in f.read()


def test_fstab_line_keyprotect_with_apikey_file(emu, tmp_path):
    """The line of the issue: BACKING MNT fuse.keyfs apikey_file=F,nofail,_netdev 0 0."""
    apikey = secret_file(tmp_path / "secrets", "data.apikey", APIKEY)
    backing = str(tmp_path / "backing")
    r = init_keyprotect(emu, backing, apikey, key=emu.kid)
    assert r.returncode == EXIT_OK, r
    out, err, _ = fstab_mount(tmp_path, backing, "apikey_file=%s,nofail,_netdev" % apikey)
    assert out == ["MOUNTED fuse.keyfs %s" % backing, "READ written through an fstab mount", "DONE"], err
    # The daemon reached Key Protect with the API key named on the fstab line: wraps
    # after init's proof (the file's key and the DEK pool), every one answered 200.
    # A pool refill under way when the mount went away is answered a moment later, or never if
    # the daemon hung up first: give answers a moment, then no wrap may have been refused.
    deadline = time.monotonic() + 5
    while True:
        statuses = [w["status"] for w in emu.requests(path="/actions/wrap")]
        if None not in statuses or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert statuses.count(200) >= 2 and set(statuses) <= {200, None}, statuses


def test_fstab_unknown_option_fails_with_a_message(volume, tmp_path):
    need_mount_tools()
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(KEYFS, str(bindir / "keyfs"))
    fstab = tmp_path / "fstab"
    fstab.write_text("%s %s fuse.keyfs nofail,pol=3 0 0\n" % (volume, mnt))
    r = subprocess.run(["unshare", "--mount", "bash", "-c", SCRIPT, "fstab-test", mnt, str(bindir), str(fstab)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "keyfs: error: unknown mount option 'pol=3'" in r.stderr
    assert "MOUNTED" not in r.stdout
