# test_secrets.py: a core of a locked daemon holds no secret: API key, tokens, DEKs, root key, written plaintext
#
# docs/LOCKING.md promises that after a lock nothing in the daemon's memory decrypts a file and
# nothing in it is the plaintext served before. The daemon is non-dumpable and has no core limit;
# the test, as root, takes a core anyway with gdb's gcore, of every mapping (also the ones
# libsodium marks MADV_DONTDUMP: a reader of /proc/PID/mem sees those too), and looks for each
# secret byte string in it.
import base64
import errno
import json
import os
import secrets
import shutil
import struct
import subprocess
import time

import pytest

from helpers import APIKEY, EXIT_OK, KEYFSCTL, expect_errno, materials, read_file, run, write_file

POLL = 3600             # no poll but the ones a test asks for: a core never catches one under way
FILES = [1, 4096, 65536 + 13, 256 * 1024]
GDB = shutil.which("gdb")

pytestmark = [
    pytest.mark.skipif(GDB is None, reason="gdb is missing (quickstart.sh test installs it)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a core of a non-dumpable daemon needs root (CAP_SYS_PTRACE)"),
]


@pytest.fixture(autouse=True)
def env(kp_client_env):
    pass


def contents(marker, size):
    """Every 4 KiB chunk of a file holds the marker many times, between random bytes."""
    unit = marker + secrets.token_bytes(32)
    return (unit * (size // len(unit) + 1))[:size]


def write_and_read(m, marker):
    """Files written, read back cold (unwraps for Key Protect), then more written to this daemon."""
    files = {"f%d" % i: contents(marker, size) for i, size in enumerate(FILES)}
    for name, data in files.items():
        write_file(m.path(name), data)
    write_file(m.path("cold"), contents(marker, 4096))      # its key is left unwrapped: see lock_and_wait
    m.umount()
    m.start()
    for name, data in files.items():
        assert read_file(m.path(name)) == data
    more = {"g%d" % i: contents(marker, size) for i, size in enumerate(FILES)}
    for name, data in more.items():
        write_file(m.path(name), data)
        assert read_file(m.path(name)) == data


def status(m):
    r = run([KEYFSCTL, "status", m.mnt, "--json"])
    return json.loads(r.stdout) if r.stdout.strip() else {}


def lock_and_wait(m, timeout=20):
    """With the key already disabled, open a file whose key this daemon never unwrapped: the
    unwrap's answer locks the mount at once (docs/LOCKING.md), as a user's first read after a
    suspend would. Returns once the mount is locked; the next poll is an hour away, so no key
    service call is under way when the core is taken."""
    expect_errno(errno.ENOKEY, read_file, m.path("cold"))
    deadline = time.monotonic() + timeout
    while True:
        st = status(m)
        if st.get("state") == "locked" and st.get("reason") == "key-suspended":
            return st
        assert time.monotonic() < deadline, "not locked as key-suspended within %d s: %r" % (timeout, st)
        time.sleep(0.05)


def maps_of(pid):
    out = []
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5].strip() if len(parts) > 5 else ""
            # Anonymous mappings by size: thread arenas, stacks, buffers, sodium_malloc pages.
            out.append((lo, hi, name or "anonymous %d KiB mapping" % ((hi - lo) >> 10)))
    return out


def load_segments(core):
    """(file offset, size, vaddr) of each PT_LOAD of an ELF64 little-endian core."""
    with open(core, "rb") as f:
        eh = f.read(64)
        assert eh[:4] == b"\x7fELF" and eh[4] == 2, "not an ELF64 core"
        phoff, = struct.unpack_from("<Q", eh, 32)
        phentsize, phnum = struct.unpack_from("<HH", eh, 54)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
    segs = []
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", ph, i * phentsize)
        if p_type == 1 and p_filesz:
            segs.append((p_offset, p_filesz, p_vaddr))
    return segs


def take_core(pid, path):
    """A core of every mapping of pid; gdb detaches when its batch ends (and if it is killed)."""
    try:
        r = subprocess.run([GDB, "-nx", "-batch", "-p", str(pid),
                            "-ex", "set use-coredump-filter off",
                            "-ex", "set dump-excluded-mappings on",
                            "-ex", "gcore " + path, "-ex", "detach"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("gdb did not write a core of pid %d within 120 s" % pid)
    assert os.path.isfile(path) and os.path.getsize(path) > 0, "gcore failed: %s" % r.stdout


def scan_core(pid, tmp_path, needles):
    """needles: {label: [bytes, ...]}. Returns {label: [(needle index, address, mapping)]}."""
    core = str(tmp_path / "daemon.core")
    maps = maps_of(pid)
    try:
        take_core(pid, core)
        segs = load_segments(core)
        with open(core, "rb") as f:
            data = f.read()
    finally:
        if os.path.exists(core):
            os.unlink(core)

    def where(off):
        for s_off, size, vaddr in segs:
            if s_off <= off < s_off + size:
                addr = vaddr + off - s_off
                for lo, hi, name in maps:
                    if lo <= addr < hi:
                        return addr, name
                return addr, "?"
        return None, "core metadata"

    found = {}
    for label, values in needles.items():
        for i, v in enumerate(values):
            assert len(v) >= 16, "needle %s[%d] too short to mean anything" % (label, i)
            off = data.find(v)
            while off >= 0:
                addr, name = where(off)
                found.setdefault(label, []).append((i, addr, name))
                off = data.find(v, off + 1)
    return found


def report(found):
    lines = []
    for label, hits in sorted(found.items()):
        places = {}
        for _i, _addr, name in hits:
            places[name] = places.get(name, 0) + 1
        lines.append("%s: %d cop%s (%s)" % (label, len(hits), "y" if len(hits) == 1 else "ies",
                                           ", ".join("%d in %s" % (n, p) for p, n in sorted(places.items()))))
    return "\n".join(lines)


def b64(b):
    return base64.b64encode(b)


def test_core_of_locked_keyprotect_daemon_holds_no_secret(emu, tmp_path, mount):
    sec = tmp_path / "secrets"
    sec.mkdir(mode=0o700)
    apikey_file = str(sec / "apikey")
    fd = os.open(apikey_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(APIKEY + "\n")
    backing = str(tmp_path / "backing")
    r = run([KEYFSCTL, "init", backing, "--kms", "keyprotect", "--endpoint", emu.url, "--iam-endpoint", emu.url,
             "--instance", emu.instance, "--key", emu.kid, "--apikey-file", apikey_file, "--ca-file", emu.ca_file])
    assert r.returncode == EXIT_OK, r
    marker = b"MARKER-" + secrets.token_hex(16).encode()

    m = mount(backing=backing, opts=["apikey_file=" + apikey_file, "poll=%d" % POLL], allow_errors=True)
    write_and_read(m, marker)
    assert emu.requests(kind="kms", path="/actions/unwrap"), "reading back made no unwrap call"
    emu.key_action(emu.kid, "disable")
    lock_and_wait(m)

    form = "grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey=" + APIKEY
    needles = {
        "API key": [APIKEY.encode()],
        "IAM form body": [form.encode()],
        "access token": [t.encode() for t in emu.issued_tokens],
        "DEK (raw)": list(emu.deks),
        "DEK (base64, as in wrap and unwrap bodies)": [b64(d) for d in emu.deks],
        "plaintext marker": [marker],
    }
    assert needles["access token"] and needles["DEK (raw)"]
    found = scan_core(m.proc.pid, tmp_path, needles)
    assert not found, ("the core of the locked daemon (pid %d) holds secrets:\n%s"
                       % (m.proc.pid, report(found)))


def test_core_of_locked_local_daemon_holds_no_secret(tmp_path, mount):
    keystore = str(tmp_path / "keystore")
    backing = str(tmp_path / "backing")
    r = run([KEYFSCTL, "init", backing, "--kms", "local", "--keystore", keystore, "--key", "test", "--create-key"])
    assert r.returncode == EXIT_OK, r
    material = list(materials(keystore, "test").values())
    assert len(material) == 1
    marker = b"MARKER-" + secrets.token_hex(16).encode()

    m = mount(backing=backing, opts=["poll=%d" % POLL], allow_errors=True)
    write_and_read(m, marker)
    r = run([KEYFSCTL, "key", "suspend", "test", "--keystore", keystore])
    assert r.returncode == EXIT_OK, r
    lock_and_wait(m)

    needles = {
        "root key (raw)": material,
        "root key (base64)": [base64.b64encode(x).rstrip(b"=") for x in material],
        "root key (hex)": [x.hex().encode() for x in material],
        "plaintext marker": [marker],
    }
    found = scan_core(m.proc.pid, tmp_path, needles)
    assert not found, ("the core of the locked daemon (pid %d) holds secrets:\n%s"
                       % (m.proc.pid, report(found)))
