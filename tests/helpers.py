# helpers.py: shared helpers of the pytest suite: binaries, keyfsctl runs, size formula, run_as
import base64
import ctypes
import glob
import hashlib
import json
import mmap
import os
import pty
import re
import secrets
import shutil
import subprocess
import sys
import time

import pytest

BUILD_DIR = os.environ.get("KEYFS_BUILD_DIR", "")
KEYFS = os.path.join(BUILD_DIR, "fs", "keyfs") if BUILD_DIR else ""
KEYFSCTL = os.path.join(BUILD_DIR, "cli", "keyfsctl") if BUILD_DIR else ""
FUSERMOUNT = shutil.which("fusermount3")
SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOUNT_TIMEOUT = 10

from layout import FORMAT, LAYOUT, LAYOUTS  # noqa: E402  (the format the suite runs on: KEYFS_TEST_FORMAT)

HEADER_SIZE = 1024                  # one header slot
HEADER_AREA = LAYOUT.header_area    # v1: two slots; v2: the header page
CHUNK = 4096
# v1 only: a chunk's nonce, tag and stored size (docs/FORMAT.md); v2 keeps nonce and tag apart.
NONCE = 24
TAG = 16
OVERHEAD = NONCE + TAG
CHUNK_DISK = CHUNK + OVERHEAD



def cpu_has_aes():
    """What fmt_cipher_default asks of the CPU: x86 aes and pclmulqdq, arm64 aes and pmull."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("flags", "Features")):
                have = line.split(":", 1)[1].split()
                return "aes" in have and ("pclmulqdq" in have or "pmull" in have)
    return False


# The cipher of the files of the suite's volumes: what keyfsctl init picks (docs/FORMAT.md).
CIPHER = "xaes-256-gcm" if FORMAT == 2 and cpu_has_aes() else "xchacha20-poly1305"
CIPHER_ID = {"xchacha20-poly1305": 1, "xaes-256-gcm": 2}[CIPHER]

# Exit codes (include/keyfs/exitcode.h).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG, EXIT_KMS = 0, 1, 2, 3, 4
EXIT_MOUNT, EXIT_IO, EXIT_DAMAGED, EXIT_LOCKED, EXIT_EXISTS = 5, 6, 7, 8, 9
EXIT_DENIED, EXIT_UNTRUSTED = 10, 11


def binaries_missing():
    if not BUILD_DIR:
        return ["KEYFS_BUILD_DIR is not set"]
    return [p for p in (KEYFS, KEYFSCTL) if not os.access(p, os.X_OK)]


def project_version():
    with open(os.path.join(SRC_DIR, "meson.build")) as f:
        m = re.search(r"project\(.*?version\s*:\s*'([^']+)'", f.read(), re.S)
    assert m, "no version in meson.build"
    return m.group(1)


def backing_size(plain):
    """Backing size of a file created through the mount holding `plain` bytes (the suite's format)."""
    return LAYOUT.backing_size(plain)


def chunk_offset(index):
    """v1 only: backing offset of chunk index."""
    return LAYOUTS[1].chunk_offset(index)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def with_format(argv):
    """keyfsctl init without --format makes a volume of the suite's format (KEYFS_TEST_FORMAT)."""
    argv = list(argv)
    if len(argv) > 1 and argv[0] == KEYFSCTL and argv[1] == "init" and "--format" not in argv:
        argv[2:2] = ["--format", str(FORMAT)]
    return argv


def run(argv, timeout=60, input=None, env=None, cwd=None):
    argv = with_format(argv)
    return subprocess.run(argv, stdin=subprocess.DEVNULL if input is None else None, input=input,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def keyfsctl(*args, check=True, timeout=60):
    r = run([KEYFSCTL, *args], timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail("keyfsctl %s failed with %d\nstdout:\n%s\nstderr:\n%s"
                    % (" ".join(args), r.returncode, r.stdout, r.stderr), pytrace=False)
    return r


def inspect_json(*paths):
    """keyfsctl inspect --json PATH...: a list of one dict per path, in order."""
    r = keyfsctl("inspect", "--json", *paths)
    text = r.stdout.strip()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        # One JSON object per line is acceptable too.
        doc = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(doc, dict):
        for k in ("files", "results"):
            if isinstance(doc.get(k), list):
                doc = doc[k]
                break
        else:
            doc = [doc]
    assert isinstance(doc, list) and len(doc) == len(paths), "inspect --json output: %r" % text
    return doc


def key_show(keystore, name):
    """keyfsctl key show: (raw stdout, dict of 'field: value' / 'field=value' lines)."""
    r = keyfsctl("key", "show", name, "--keystore", keystore)
    fields = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_ -]*?)\s*[:=]\s*(.*?)\s*$", line)
        if m:
            fields.setdefault(m.group(1).strip().lower(), m.group(2))
    return r.stdout, fields


def wait_for(cond, timeout=10, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %s s waiting for %s" % (timeout, what))
        time.sleep(interval)


def proc_mounts_entry(mnt):
    """(source, fstype) of mountpoint mnt in /proc/mounts, or None."""
    def unescape(s):
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
    found = None
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and unescape(fields[1]) == mnt:
                found = (unescape(fields[0]), fields[2])
    return found


def is_mounted(path):
    """True when path is a mountpoint in our mount table (unlike os.path.ismount, also when the
    mount is dead and stat() fails with ENOTCONN)."""
    return proc_mounts_entry(os.path.abspath(path)) is not None


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root")


def _drop(uid, gid, groups):
    def fn():
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)
    return fn


def run_as(uid, gid, argv, groups=(), timeout=60, **kw):
    """Run argv as uid/gid (root only) and return the CompletedProcess."""
    need_root()
    argv = with_format(argv)
    return subprocess.run(argv, preexec_fn=_drop(uid, gid, groups), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, cwd="/", **kw)


_PY_WRAPPER = r"""
import json, os, sys
def main():
%s
try:
    res = main()
    print(json.dumps({"ok": True, "result": res}))
except OSError as e:
    print(json.dumps({"ok": False, "errno": e.errno, "msg": str(e)}))
"""


def py_as(uid, gid, body, groups=()):
    """Run an indented python function body as uid/gid. Returns ('ok', result) or ('errno', n)."""
    code = _PY_WRAPPER % "\n".join("    " + line for line in body.strip("\n").splitlines())
    r = run_as(uid, gid, [sys.executable, "-c", code], groups=groups)
    assert r.returncode == 0, "child failed: %s %s" % (r.stdout, r.stderr)
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    if doc["ok"]:
        return ("ok", doc["result"])
    return ("errno", doc["errno"])


def write_file(path, data, mode="wb"):
    with open(path, mode) as f:
        f.write(data)


def direct_pread(fd, size, off):
    """An O_DIRECT read needs an aligned buffer: an anonymous mapping is page aligned."""
    buf = mmap.mmap(-1, size)
    try:
        n = os.preadv(fd, [buf], off)
        return bytes(buf[:n])
    finally:
        buf.close()


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def expect_errno(err, fn, *args, **kw):
    """Call fn and assert it raises OSError with errno err; returns the exception."""
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == err, "expected %s, got %r" % (os.strerror(err), ei.value)
    return ei.value


def backing_files(backing):
    """Every regular file of a backing tree except the volume description."""
    out = []
    for root, dirs, files in os.walk(backing):
        for n in files:
            p = os.path.join(root, n)
            if root == backing and n == ".keyfs":
                continue
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(p)
    return out


def secret_file(directory, name, text):
    """A 0600 file holding text and a newline in a 0700 dir (made if missing): an API key file."""
    os.makedirs(str(directory), mode=0o700, exist_ok=True)
    path = os.path.join(str(directory), name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


# API keys the Key Protect emulator knows (the `emu` fixture of conftest.py), one per IAM role, and one it
# does not know. Random per run: a test that scans output or memory for them finds only real leaks.
APIKEY = "kpi-manager-" + secrets.token_hex(20)
READER_APIKEY = "kpi-reader-" + secrets.token_hex(20)
NOACCESS_APIKEY = "kpi-none-" + secrets.token_hex(20)
UNKNOWN_APIKEY = "kpi-unknown-" + secrets.token_hex(20)
EMU_APIKEYS = {APIKEY: "manager", READER_APIKEY: "reader", NOACCESS_APIKEY: "none"}


def init_keyprotect(emu, backing, apikey_file, key=None):
    """keyfsctl init of a Key Protect volume on the emulator's key, as the README shows it."""
    return run([KEYFSCTL, "init", backing, "--kms", "keyprotect", "--endpoint", emu.url, "--iam-endpoint", emu.url,
                "--instance", emu.instance, "--key", key or emu.kid, "--apikey-file", apikey_file,
                "--ca-file", emu.ca_file])


# The local keystore's files (docs/FORMAT.md, "The local keystore"): NAME.vN.material files (112 bytes,
# material at offset 48), and for keystores of an earlier keyfs (format 1) "version=N BASE64" lines of NAME.key.
MAT_SIZE = 112
MAT_MAGIC = b"KEYFSKM1"
MAT_OFF = 48
OLD_LINE = re.compile(rb"^version=(\d+) ([A-Za-z0-9+/=]{44})$", re.M)


def materials(keystore, name):
    """{version: 32 bytes of material} of key name, read from its files as they are now."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(keystore), glob.escape(name) + ".v*.material")):
        data = read_file(path)
        m = re.fullmatch(re.escape(name) + r"\.v(\d+)\.material", os.path.basename(path))
        assert m and len(data) == MAT_SIZE and data[:8] == MAT_MAGIC, path
        assert int.from_bytes(data[8:12], "little") == int(m.group(1)), path
        found[int(m.group(1))] = data[MAT_OFF:MAT_OFF + 32]
    for v, b64 in OLD_LINE.findall(read_file(os.path.join(keystore, name + ".key"))):
        found[int(v)] = base64.b64decode(b64)
    assert all(len(x) == 32 for x in found.values()), found
    return found


# ---- system calls Python's os module lacks, and tampering with a backing file ----

AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def fallocate(fd, mode, off, length):
    """fallocate(2) with any mode (os.posix_fallocate has none); OSError with errno on failure."""
    fn = _libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if fn(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(old, new, flags):
    """renameat2(2) of two paths with flags (RENAME_NOREPLACE 1, RENAME_EXCHANGE 2, RENAME_WHITEOUT 4)."""
    fn = _libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def flip(path, off, mask=0x01):
    """XOR one byte of a (backing) file in place, as an attacker or a bad disk would."""
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        assert len(b) == 1, "offset %d is beyond the end of %s" % (off, path)
        f.seek(off)
        f.write(bytes([b[0] ^ mask]))


def run_stderr_on_tty(argv, timeout=60):
    """Run argv with stderr on a pseudo-terminal (where progress lines go): (returncode, stdout bytes,
    the bytes the terminal got)."""
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        slave = -1
        out, _ = p.communicate(timeout=timeout)
        tty = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            tty += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return p.returncode, out, tty
