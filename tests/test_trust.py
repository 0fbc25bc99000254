# test_trust.py: nothing in the backing dir chooses where the API key or a file key goes (host-side trust)
#
# The volume description .keyfs lives in the backing dir, which keyfs defends against. Each test
# plays a backing-dir writer who rewrites it to name their own key service (a second Key Protect
# emulator, or their own keystore), and checks that keyfs, fsck and rewrap refuse the volume,
# naming the field, before a single connection is made; and that the host's ways to trust a
# volume (init's record, keyfsctl trust, mount options) work.
import os
import pty
import shutil
import stat
import subprocess

import pytest

from helpers import (APIKEY, EXIT_OK, EXIT_UNTRUSTED, EXIT_USAGE, FUSERMOUNT, KEYFS, KEYFSCTL, init_keyprotect, is_mounted,
                     key_show, keyfsctl, read_file, run, run_as, secret_file, write_file)

# Starts keyfs to mount without the mount fixture: needs /dev/fuse (conftest.py).
pytestmark = pytest.mark.fuse

REFUSED = "refusing it before any key service is contacted"


@pytest.fixture
def real(emu):
    """The key service the host trusts."""
    return emu


@pytest.fixture
def attacker(emu_factory):
    """The backing-dir writer's own key service: it would answer like the real one."""
    return emu_factory()


def desc(backing):
    out = {}
    for line in read_file(os.path.join(backing, ".keyfs")).decode().splitlines():
        k, sep, v = line.partition("=")
        if sep and not line.startswith("#"):
            out[k] = v
    return out


def rewrite(backing, **fields):
    """Rewrite .keyfs as a backing-dir writer would: fields set, or dropped when None."""
    p = os.path.join(backing, ".keyfs")
    out, seen = [], set()
    for line in read_file(p).decode().splitlines():
        k, sep, _ = line.partition("=")
        if sep and k in fields:
            seen.add(k)
            if fields[k] is not None:
                out.append("%s=%s" % (k, fields[k]))
            continue
        out.append(line)
    out += ["%s=%s" % (k, v) for k, v in fields.items() if k not in seen and v is not None]
    write_file(p, ("\n".join(out) + "\n").encode())


def record_path(trust_dir, backing):
    return os.path.join(trust_dir, desc(backing)["volume"])


def try_mount(backing, mnt, opts=(), env=None):
    """keyfs as a user runs it (it goes to the background once mounted). A mount that should
    have been refused is unmounted at once, so that the test fails cleanly."""
    os.makedirs(mnt, exist_ok=True)
    argv = [KEYFS, backing, mnt] + (["-o", ",".join(opts)] if opts else [])
    e = dict(os.environ)
    e.update(env or {})
    r = run(argv, timeout=60, env=e)
    if is_mounted(mnt):
        subprocess.run([FUSERMOUNT, "-u", mnt], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
        pytest.fail("keyfs mounted a volume it should have refused:\n%s" % r.stderr, pytrace=False)
    return r


def attempt(cmd, backing, tmp_path, apikey=None, env=None):
    """The mount, fsck or rewrap of backing, as a user runs it: the CompletedProcess."""
    if cmd == "mount":
        return try_mount(backing, str(tmp_path / "mnt"), ["apikey_file=" + apikey] if apikey else (), env=env)
    e = dict(os.environ)
    e.update(env or {})
    return run([KEYFSCTL, cmd, backing] + (["--apikey-file", apikey] if apikey else []), timeout=60, env=e)


def refusal(cmd, backing, field, said, trusted, record):
    prog = "keyfs" if cmd == "mount" else "keyfsctl"
    return ("%s: error: volume '%s': its .keyfs says %s '%s' but this host trusts '%s' (%s): %s; if the key service "
            "really moved, run 'keyfsctl trust %s'\n" % (prog, backing, field, said, trusted, record, REFUSED, backing))


def kp_volume(emu, tmp_path):
    apikey = secret_file(tmp_path / "secrets", "apikey", APIKEY)
    backing = os.path.realpath(str(tmp_path)) + "/backing"
    r = init_keyprotect(emu, backing, apikey)
    assert r.returncode == EXIT_OK, r.stderr
    return backing, apikey


@pytest.mark.parametrize("cmd", ["mount", "fsck", "rewrap"])
@pytest.mark.parametrize("field", ["iam_endpoint", "endpoint"])
def test_rewritten_key_service_url_is_refused_before_any_connection(real, attacker, tmp_path, trust_dir, field,
                                                                     cmd):
    backing, apikey = kp_volume(real, tmp_path)
    # The attacker's server, and a CA file for it dropped into the backing dir.
    shutil.copy(attacker.ca_file, os.path.join(backing, "ca.pem"))
    rewrite(backing, **{field: attacker.url, "ca_file": os.path.join(backing, "ca.pem")})
    before = real.connections
    r = attempt(cmd, backing, tmp_path, apikey)
    assert r.returncode == EXIT_UNTRUSTED, r.stderr
    assert r.stderr == refusal(cmd, backing, field, attacker.url, real.url, record_path(trust_dir, backing))
    # No connection at all: neither the attacker's server nor the real one heard of it.
    assert attacker.connections == 0 and attacker.requests() == [] and attacker.token_requests() == []
    assert real.connections == before


@pytest.mark.parametrize("cmd", ["mount", "fsck", "rewrap"])
def test_swapped_local_keystore_is_refused(volume, keystore, tmp_path, trust_dir, cmd):
    # The attacker's keystore, with a key of the same name; the description points at it.
    evil = str(tmp_path / "evil-keystore")
    keyfsctl("key", "create", "test", "--keystore", evil)
    _, info = key_show(evil, "test")
    trusted = desc(volume)["keystore"]
    rewrite(volume, keystore=evil, key_id=info["id"])
    listing = sorted(os.listdir(evil))
    r = attempt(cmd, volume, tmp_path)
    assert r.returncode == EXIT_UNTRUSTED, r.stderr
    assert r.stderr == refusal(cmd, volume, "keystore", evil, trusted, record_path(trust_dir, volume))
    assert sorted(os.listdir(evil)) == listing


@pytest.mark.parametrize("cmd", ["mount", "fsck", "rewrap"])
def test_local_volume_turned_keyprotect_is_refused(volume, attacker, tmp_path, trust_dir, cmd):
    """kms swapped: a local volume made to send the host's systemd API key to the attacker."""
    creds = tmp_path / "creds"
    secret_file(creds, "apikey", APIKEY)
    shutil.copy(attacker.ca_file, os.path.join(volume, "ca.pem"))
    rewrite(volume, kms="keyprotect", keystore=None, endpoint=attacker.url, iam_endpoint=attacker.url,
            instance=attacker.instance, key=attacker.kid, key_id=attacker.kid, ca_file=os.path.join(volume, "ca.pem"))
    r = attempt(cmd, volume, tmp_path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == EXIT_UNTRUSTED, r.stderr
    assert r.stderr == refusal(cmd, volume, "kms", "keyprotect", "local", record_path(trust_dir, volume))
    assert attacker.connections == 0


def test_volume_from_elsewhere_needs_keyfsctl_trust(real, tmp_path, trust_dir, mount):
    backing, apikey = kp_volume(real, tmp_path)
    record = record_path(trust_dir, backing)
    uuid = desc(backing)["volume"]
    os.unlink(record)               # as on a host that did not make the volume
    before = real.connections
    r = try_mount(backing, str(tmp_path / "mnt0"), ["apikey_file=" + apikey])
    assert r.returncode == EXIT_UNTRUSTED
    assert r.stderr == (
        "keyfs: error: volume '%s' (uuid %s) is not trusted on this host: no record of its key service in %s; "
        "check the key service its .keyfs names and run 'keyfsctl trust %s' (needed once for a volume made on "
        "another host or by a keyfs that did not record trust), or state it in mount options (kms=,key=,...; "
        "see keyfs(8))\n" % (backing, uuid, trust_dir, backing))
    r = run([KEYFSCTL, "fsck", backing, "--apikey-file", apikey])
    assert r.returncode == EXIT_UNTRUSTED and "run 'keyfsctl trust %s'" % backing in r.stderr, r.stderr
    assert real.connections == before

    shown = ("volume '%s' (uuid %s) names this key service:\n"
             "  kms           keyprotect\n"
             "  endpoint      %s\n"
             "  iam_endpoint  %s\n"
             "  ca_file       %s\n"
             "  instance      %s\n"
             "  key           %s\n"
             "  key_id        %s\n"
             "  key_crn       %s\n"
             "Trusting it lets keyfs, fsck and rewrap send this volume's file keys and this host's API key there.\n"
             "Trust it only if you know this is where the volume's key lives.\n"
             % (backing, uuid, real.url, real.url, real.ca_file, real.instance, real.kid, real.kid,
                "crn:v1:bluemix:public:kms:local:a/kpemu:%s:key:%s" % (real.instance, real.kid)))
    # Without a terminal to ask on, --yes is required; nothing is recorded.
    r = run([KEYFSCTL, "trust", backing])
    assert r.returncode == EXIT_USAGE
    assert r.stdout == shown
    assert r.stderr.startswith("keyfsctl: error: stdin is not a terminal: give --yes to trust it\n")
    assert not os.path.exists(record)

    r = run([KEYFSCTL, "trust", "--yes", backing])
    assert r.returncode == EXIT_OK, r.stderr
    assert r.stdout == shown + "trusted: recorded in '%s'\n" % record
    assert stat.S_IMODE(os.stat(record).st_mode) == 0o644       # root's: no secret in it
    m = mount(backing=backing, opts=["apikey_file=" + apikey])
    write_file(m.path("f"), b"trusted once")
    assert read_file(m.path("f")) == b"trusted once"
    # Trusting again changes nothing and says so.
    r = run([KEYFSCTL, "trust", "--yes", backing])
    assert r.returncode == EXIT_OK
    assert r.stdout.startswith("volume '%s' (uuid %s) is already trusted on this host ('%s'):\n" % (backing, uuid, record))


def ask_on_tty(argv, answer):
    """Run argv with a terminal as stdin, answer the question; (exit code, stdout)."""
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(master, answer.encode())
        out, err = p.communicate(timeout=30)
    finally:
        os.close(master)
        os.close(slave)
    return p.returncode, out, err


def test_trust_asks_on_a_terminal(volume, trust_dir):
    record = record_path(trust_dir, volume)
    os.unlink(record)
    rc, out, err = ask_on_tty([KEYFSCTL, "trust", volume], "n\n")
    assert rc == EXIT_UNTRUSTED, err
    assert out.endswith("Trust it? [y/N] ") and "  keystore      %s\n" % desc(volume)["keystore"] in out
    assert err == "keyfsctl: error: volume '%s' not trusted: nothing recorded\n" % volume
    assert not os.path.exists(record)
    rc, out, err = ask_on_tty([KEYFSCTL, "trust", volume], "y\n")
    assert rc == EXIT_OK, err
    assert out.endswith("Trust it? [y/N] trusted: recorded in '%s'\n" % record)
    assert os.path.isfile(record)


def test_changed_record_is_shown_before_it_is_replaced(volume, keystore, tmp_path, trust_dir):
    other = str(tmp_path / "moved-keystore")
    shutil.copytree(keystore, other)
    rewrite(volume, keystore=other)
    r = run([KEYFSCTL, "trust", "--yes", volume])
    assert r.returncode == EXIT_OK, r.stderr
    assert ("WARNING: this host trusts another key service for this volume ('%s'):\n" % record_path(trust_dir, volume)
            in r.stdout)
    assert "  keystore      %s\n" % keystore in r.stdout and "  keystore      %s\n" % other in r.stdout
    keyfsctl("fsck", volume)


def test_forget_by_backing_or_uuid(volume, trust_dir, tmp_path):
    record = record_path(trust_dir, volume)
    uuid = desc(volume)["volume"]
    r = keyfsctl("trust", "--forget", volume)
    assert r.stdout == "volume %s is no longer trusted on this host (removed '%s')\n" % (uuid, record)
    assert not os.path.exists(record)
    r = run([KEYFSCTL, "trust", "--forget", uuid])
    assert r.returncode == EXIT_UNTRUSTED
    assert r.stderr == "keyfsctl: error: volume %s is not trusted on this host: no record '%s'\n" % (uuid, record)
    # A uuid works when the backing dir is gone.
    keyfsctl("trust", "--yes", volume)
    shutil.rmtree(volume)
    keyfsctl("trust", "--forget", uuid)
    assert not os.path.exists(record)


def test_mount_options_state_the_location(volume, keystore, trust_dir, mount, tmp_path):
    os.unlink(record_path(trust_dir, volume))
    m = mount(backing=volume, opts=["kms=local", "key=test", "keystore=" + keystore])
    write_file(m.path("f"), b"stated")
    m.umount()
    # An option that disagrees is refused, naming it.
    for opts, field, said, stated in (
            (["kms=local", "key=other", "keystore=" + keystore], "key", "test", "'other'"),
            (["kms=local", "key=test"], "keystore", desc(volume)["keystore"], "(none)"),
            (["kms=keyprotect", "key=test", "endpoint=https://127.0.0.1:9"], "kms", "local", "'keyprotect'")):
        r = try_mount(volume, str(tmp_path / "mnt2"), opts)
        assert r.returncode == EXIT_UNTRUSTED, r.stderr
        assert r.stderr == ("keyfs: error: volume '%s': its .keyfs says %s '%s' but the mount options say %s: %s\n"
                            % (volume, field, said, stated, REFUSED))
    # The key id in .keyfs must be the stated key's own.
    rewrite(volume, key_id="00000000-0000-4000-8000-000000000000")
    r = try_mount(volume, str(tmp_path / "mnt2"), ["kms=local", "key=test", "keystore=" + keystore])
    assert r.returncode == EXIT_UNTRUSTED
    assert "its .keyfs says key_id '00000000-0000-4000-8000-000000000000' but key 'test'" in r.stderr
    # A location option without kms= is a usage error.
    r = try_mount(volume, str(tmp_path / "mnt2"), ["key=test"])
    assert r.returncode == EXIT_USAGE
    assert r.stderr.startswith("keyfs: error: mount option 'key' states where the key service is: give kms= with it\n")


def test_mount_options_state_a_keyprotect_location(real, tmp_path, trust_dir, mount):
    backing, apikey = kp_volume(real, tmp_path)
    os.unlink(record_path(trust_dir, backing))
    m = mount(backing=backing, opts=["kms=keyprotect", "key=" + real.kid, "endpoint=" + real.url,
                                     "instance=" + real.instance, "iam_endpoint=" + real.url,
                                     "ca_file=" + real.ca_file, "apikey_file=" + apikey])
    write_file(m.path("f"), b"stated")
    assert read_file(m.path("f")) == b"stated"


def test_host_keystore_option_replaces_the_description_value(volume, keystore, tmp_path, mount):
    """-o keystore= is the host's word: the description's keystore is neither used nor compared."""
    rewrite(volume, keystore=str(tmp_path / "somewhere-else"))
    m = mount(backing=volume, opts=["keystore=" + keystore])
    write_file(m.path("f"), b"host speaking")
    m.umount()
    r = run([KEYFSCTL, "fsck", volume, "--keystore", keystore])
    assert r.returncode == EXIT_OK, r.stderr


def test_unsafe_record_is_refused(volume, trust_dir, tmp_path):
    record = record_path(trust_dir, volume)
    os.chmod(record, 0o666)
    r = try_mount(volume, str(tmp_path / "mnt"))
    assert r.returncode == EXIT_UNTRUSTED
    assert r.stderr == ("keyfs: error: trust record '%s' is writable by group or others (mode 0666): refusing to trust it\n"
                        % record)


def test_init_records_trust_in_the_trust_dir(volume, trust_dir, keystore):
    record = record_path(trust_dir, volume)
    text = read_file(record).decode()
    assert stat.S_IMODE(os.stat(record).st_mode) == 0o644
    rec = {k: v for k, _, v in (line.partition("=") for line in text.splitlines() if "=" in line and line[0] != "#")}
    assert rec == desc(volume)


def test_user_records_live_in_the_xdg_config_dir(world_tmp):
    """A user's default: $XDG_CONFIG_HOME/keyfs/volumes, dir 0700, record 0600."""
    home = os.path.join(world_tmp, "home")
    os.mkdir(home)
    os.chown(home, 65534, 65534)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "XDG_CONFIG_HOME": home + "/cfg"}
    r = run_as(65534, 65534, [KEYFSCTL, "init", home + "/backing", "--kms", "local", "--keystore", home + "/ks",
                              "--key", "k", "--create-key"], env=env)
    assert r.returncode == EXIT_OK, r.stderr
    record = os.path.join(home, "cfg", "keyfs", "volumes", desc(home + "/backing")["volume"])
    assert "  trusted:  %s\n" % record in r.stdout
    assert stat.S_IMODE(os.stat(record).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(record)).st_mode) == 0o700
    assert os.stat(record).st_uid == 65534
    r = run_as(65534, 65534, [KEYFSCTL, "fsck", home + "/backing"], env=env)
    assert r.returncode == EXIT_OK, r.stderr


def test_root_records_live_in_etc_keyfs_volumes(tmp_path, keystore):
    """root's default, the one place the suite writes /etc: the record is removed again."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    env = {k: v for k, v in os.environ.items() if k != "KEYFS_TRUST_DIR"}
    made = [d for d in ("/etc/keyfs", "/etc/keyfs/volumes") if not os.path.exists(d)]
    backing = str(tmp_path / "backing")
    r = run([KEYFSCTL, "init", backing, "--kms", "local", "--keystore", keystore, "--key", "k", "--create-key"],
            env=env)
    assert r.returncode == EXIT_OK, r.stderr
    record = "/etc/keyfs/volumes/" + desc(backing)["volume"]
    try:
        assert "  trusted:  %s\n" % record in r.stdout
        assert stat.S_IMODE(os.stat(record).st_mode) == 0o644
        assert stat.S_IMODE(os.stat("/etc/keyfs/volumes").st_mode) == 0o755
        if "/etc/keyfs" in made:    # it also holds the API keys of keyfs@.service
            assert stat.S_IMODE(os.stat("/etc/keyfs").st_mode) == 0o700
        r = run([KEYFSCTL, "fsck", backing], env=env)
        assert r.returncode == EXIT_OK, r.stderr
    finally:
        r = run([KEYFSCTL, "trust", "--forget", backing], env=env)
        for d in reversed(made):
            os.rmdir(d)
    assert r.returncode == EXIT_OK, r.stderr
    assert not os.path.exists(record)
