# test_shared.py: shared volumes (docs/LOCKING.md, "Shared volumes"): one volume mounted by two daemons at once
#
# Two daemons of one machine stand in for two hosts: separate mountpoints, control sockets and
# key pollers, one backing directory, nothing shared between them but the backing files and
# their OFD byte-range locks. No test sleeps to let time pass: visibility and locking are
# conditions polled against the documented bounds (shared_timeout, poll + 1 s).
import errno
import os
import random
import shutil
import subprocess
import threading
import time

import pytest

from helpers import (EXIT_MOUNT, EXIT_OK, KEYFS, KEYFSCTL, expect_errno, inspect_json, is_mounted, keyfsctl, read_file,
                     run, write_file)
from test_lock import control

pytestmark = pytest.mark.fuse

POLL = 1
SLACK = 0.5
SHARED_TIMEOUT = 1          # the default -o shared_timeout, the documented visibility bound
FIO = shutil.which("fio")


@pytest.fixture
def shared_volume(tmp_path, keystore):
    backing = str(tmp_path / "backing")
    keyfsctl("init", backing, "--kms", "local", "--keystore", keystore, "--key", "test", "--create-key", "--shared")
    return backing


@pytest.fixture
def pair(mount, shared_volume):
    """Two daemons on one shared volume: (A, B)."""
    a = mount(backing=shared_volume, opts=["poll=%d" % POLL])
    b = mount(backing=shared_volume, opts=["poll=%d" % POLL])
    return a, b


def start_keyfs(backing, mnt, *opts):
    """keyfs in the foreground, expected to refuse: its exit status and stderr."""
    os.makedirs(mnt, exist_ok=True)
    argv = [KEYFS, backing, mnt, "-f"] + (["-o", ",".join(opts)] if opts else [])
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    finally:
        if is_mounted(mnt):     # it mounted after all (killed by the timeout): ours to undo
            subprocess.run(["fusermount3", "-u", "-z", mnt])
    return r.returncode, r.stderr


# ---- the mode: chosen at init or per mount; exclusive and shared exclude each other ----

def test_init_shared_writes_the_description_and_mounts_twice(pair, shared_volume):
    a, b = pair
    with open(os.path.join(shared_volume, ".keyfs")) as f:
        assert "shared=1\n" in f.read().splitlines(keepends=True)
    for m in pair:
        assert ", shared" in m.stderr(), m.stderr()
    write_file(a.path("x"), b"from a")
    assert read_file(b.path("x")) == b"from a"


def test_shared_description_value_is_checked(tmp_path, shared_volume, mount):
    desc = os.path.join(shared_volume, ".keyfs")
    with open(desc) as f:
        text = f.read()
    with open(desc, "w") as f:
        f.write(text.replace("shared=1", "shared=2"))
    code, err = start_keyfs(shared_volume, str(tmp_path / "m"))
    assert code == 3, err
    assert "'shared' must be 1 (or left out)" in err, err


@pytest.mark.parametrize("first,second", [("exclusive", "shared"), ("shared", "exclusive")])
def test_exclusive_and_shared_mounts_refuse_each_other(mount, volume, tmp_path, first, second):
    # A volume made without --shared: -o shared makes a mount shared, -o noshared exclusive.
    opt = {"shared": "shared", "exclusive": "noshared"}
    m = mount(backing=volume, opts=[opt[first]])
    t0 = time.monotonic()
    code, err = start_keyfs(volume, str(tmp_path / "second"), opt[second])
    took = time.monotonic() - t0
    assert code == EXIT_MOUNT, err
    if first == "exclusive":
        assert ("volume '%s' is mounted exclusively by another keyfs" % volume) in err, err
        assert "mount every mount of it with -o shared, or none" in err, err
    else:
        assert ("volume '%s' is mounted shared by another keyfs" % volume) in err, err
        assert "mount this one with -o shared too" in err, err
    assert took < 5, "refused only after %.1f s" % took
    # The first mount is unharmed, and a second mount of its own kind is fine when shared.
    write_file(m.path("f"), b"still here")
    assert read_file(m.path("f")) == b"still here"
    if first == "shared":
        m2 = mount(backing=volume, opts=["shared"])
        assert read_file(m2.path("f")) == b"still here"


def test_two_exclusive_mounts_still_refused(mount, shared_volume, tmp_path):
    mount(backing=shared_volume, opts=["noshared"])
    code, err = start_keyfs(shared_volume, str(tmp_path / "second"), "noshared")
    assert code == EXIT_MOUNT, err
    assert "one mount per volume unless every mount is shared (-o shared)" in err, err


def test_shared_options_are_checked(shared_volume, tmp_path):
    for opt in ("shared_timeout=-1", "shared_timeout=3601", "shared_timeout=x", "shared_timeout="):
        code, err = start_keyfs(shared_volume, str(tmp_path / "m"), opt)
        assert code == 2, (opt, err)
        assert "shared_timeout" in err, (opt, err)


# ---- concurrent writers through two daemons ----

def fio(*args, cwd=None):
    argv = [FIO, "--ioengine=psync", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
            "--output-format=terse", "--terse-version=3", "--verify_state_save=0", *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)


def fio_pair(jobs):
    procs = [fio(*job) for job in jobs]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "verify:" not in out and "err=" not in out, out
        # terse v3: field 5 is the job's error (0: none)
        assert out.strip().splitlines()[-1].split(";")[4] == "0", out


@pytest.mark.skipif(not FIO, reason="fio not installed (.ci/run installs it)")
def test_fio_verify_disjoint_ranges_sharing_a_chunk(pair):
    a, b = pair
    size = 2 << 20
    # A owns [0, 2 MiB + 2 KiB), B the 2 MiB after: the chunk at 2 MiB holds both, so its
    # read-modify-writes from two daemons race unless the chunk lock keeps them apart.
    split = size + 2048
    with open(a.path("f"), "wb") as f:
        f.truncate(split + size)
    common = ["--rw=randwrite", "--bs=512", "--norandommap=0", "--randrepeat=1"]
    fio_pair([
        ["--name=a", "--filename=" + a.path("f"), "--offset=0", "--size=%d" % split, *common],
        ["--name=b", "--filename=" + b.path("f"), "--offset=%d" % split, "--size=%d" % size, *common],
    ])
    # Each writer's blocks, read through the other daemon (fio replays its job: verify_only).
    fio_pair([
        ["--name=a", "--filename=" + b.path("f"), "--offset=0", "--size=%d" % split, "--verify_only=1", *common],
        ["--name=b", "--filename=" + a.path("f"), "--offset=%d" % split, "--size=%d" % size, "--verify_only=1",
         *common],
    ])
    assert os.stat(a.path("f")).st_size == split + size


@pytest.mark.skipif(not FIO, reason="fio not installed (.ci/run installs it)")
def test_fio_verify_overlapping_ranges_interleaved_blocks(pair):
    a, b = pair
    size = 4 << 20
    # Both writers over the same 4 MiB, each owning every other 2 KiB: every 4 KiB chunk is
    # written by both daemons at once, 512 bytes at a time.
    with open(a.path("f"), "wb") as f:
        f.truncate(size + 4096)
    common = ["--rw=write", "--bs=512", "--size=%d" % size, "--zonemode=strided", "--zonesize=2k",
              "--zonerange=4k"]
    for _ in range(2):
        fio_pair([
            ["--name=a", "--filename=" + a.path("f"), "--offset=0", *common],
            ["--name=b", "--filename=" + b.path("f"), "--offset=2k", *common],
        ])
    fio_pair([
        ["--name=a", "--filename=" + b.path("f"), "--offset=0", "--verify_only=1", *common],
        ["--name=b", "--filename=" + a.path("f"), "--offset=2k", "--verify_only=1", *common],
    ])


def test_appends_from_both_mounts_lose_nothing(pair):
    a, b = pair
    n, rec = 400, 100
    errors = []

    def appender(m, tag):
        try:
            fd = os.open(m.path("log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                for k in range(n):
                    line = ("%s %06d " % (tag, k)).encode()
                    os.write(fd, line + b"." * (rec - len(line) - 1) + b"\n")
            finally:
                os.close(fd)
        except OSError as e:
            errors.append(e)

    write_file(a.path("log"), b"")
    threads = [threading.Thread(target=appender, args=(m, t)) for m, t in ((a, "A"), (b, "B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for m in pair:
        data = read_file(m.path("log"))
        assert len(data) == 2 * n * rec
        lines = data.split(b"\n")[:-1]
        for tag in (b"A", b"B"):
            got = [int(x.split()[1]) for x in lines if x.startswith(tag + b" ")]
            assert got == list(range(n)), tag
        assert all(len(x) == rec - 1 and x.endswith(b".") for x in lines)


def test_header_made_once_when_both_mounts_write_a_new_file(pair):
    a, b = pair
    # A file made in the backing dir has no header: the first write through either daemon
    # makes it, and the other must use that one, not write its own over it.
    errors = []
    names = ["r%02d" % k for k in range(16)]
    for name in names:
        open(a.bpath(name), "wb").close()

    def writer(m, base):
        try:
            for name in names:
                fd = os.open(m.path(name), os.O_WRONLY)
                try:
                    os.pwrite(fd, bytes([base]) * 4096, base * 4096)
                finally:
                    os.close(fd)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(m, k)) for k, m in enumerate(pair)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for name in names:
        for m in pair:
            assert read_file(m.path(name)) == b"\0" * 4096 + b"\1" * 4096, (m.mnt, name)
    assert len({h["file_id"] for h in inspect_json(*[a.bpath(n) for n in names])}) == len(names)


def test_fsx_on_one_mount_while_the_other_reads_and_appends(pair):
    a, b = pair
    rng = random.Random(1414)
    model = bytearray()
    stop = threading.Event()
    errors = []
    appended = []

    def other():
        # B: reads the file A changes (every read authenticates: no EIO), and appends records
        # to a log A checks.
        k = 0
        try:
            while not stop.is_set():
                try:
                    with open(b.path("fsx"), "rb") as f:
                        f.read()
                except FileNotFoundError:
                    pass
                with open(b.path("log"), "ab") as f:
                    f.write(b"%08d\n" % k)
                appended.append(k)
                k += 1
        except (OSError, AssertionError) as e:
            errors.append(e)

    write_file(a.path("fsx"), b"")
    t = threading.Thread(target=other)
    t.start()
    fd = os.open(a.path("fsx"), os.O_RDWR)
    try:
        for step in range(1500):
            op = rng.random()
            if op < 0.45:
                off = rng.randrange(0, (len(model) + 65536) if model else 65536)
                n = rng.randrange(1, 20000)
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                if off > len(model):
                    model.extend(b"\0" * (off - len(model)))
                model[off:off + n] = data
            elif op < 0.75:
                off = rng.randrange(0, len(model) + 1)
                n = rng.randrange(1, 30000)
                assert os.pread(fd, n, off) == bytes(model[off:off + n]), step
            elif op < 0.85:
                size = rng.randrange(0, 1 << 20)
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(b"\0" * (size - len(model)))
            else:
                # A reads B's appends: always whole records, in order (none yet, while B's
                # create is not visible here).
                try:
                    with open(a.path("log"), "rb") as f:
                        log = f.read()
                except FileNotFoundError:
                    log = b""
                assert len(log) % 9 == 0, step
                assert log == b"".join(b"%08d\n" % k for k in range(len(log) // 9)), step
            assert os.fstat(fd).st_size == len(model), step
    finally:
        os.close(fd)
        stop.set()
        t.join()
    assert errors == []
    assert len(appended) > 0
    # B sees A's final file within the visibility bound.
    deadline = time.monotonic() + SHARED_TIMEOUT + SLACK
    while read_file(b.path("fsx")) != bytes(model):
        assert time.monotonic() < deadline, "B does not see A's file within %d s" % SHARED_TIMEOUT
        time.sleep(0.02)
    # And A sees all of B's appends within the same bound (A may hold the log's size from a
    # lookup less than shared_timeout ago).
    want = b"".join(b"%08d\n" % k for k in appended)
    deadline = time.monotonic() + SHARED_TIMEOUT + SLACK
    while read_file(a.path("log")) != want:
        assert time.monotonic() < deadline, "A does not see B's appends within %d s" % SHARED_TIMEOUT
        time.sleep(0.02)


# ---- visibility ----

def test_change_on_one_mount_visible_on_the_other_within_the_timeout(pair):
    a, b = pair
    worst = 0.0
    # B has looked at the file (its size and pages cached) before each change on A.
    write_file(a.path("v"), b"0" * 100)
    for k in range(1, 6):
        assert len(read_file(b.path("v"))) == 100 * k
        os.stat(b.path("v"))
        data = (b"%d" % k) * (100 * (k + 1))
        t0 = time.monotonic()
        write_file(a.path("v"), data)
        while True:
            try:
                if read_file(b.path("v")) == data:
                    break
            except OSError as e:
                pytest.fail("B: %s" % e)
            took = time.monotonic() - t0
            assert took < SHARED_TIMEOUT + SLACK, "not visible on B after %.2f s" % took
            time.sleep(0.01)
        worst = max(worst, time.monotonic() - t0)
    # A new name on A shows on B (B had looked it up before: a negative entry) within the bound.
    expect_errno(errno.ENOENT, os.stat, b.path("new"))
    t0 = time.monotonic()
    write_file(a.path("new"), b"n")
    while not os.path.exists(b.path("new")):
        assert time.monotonic() - t0 < SHARED_TIMEOUT + SLACK
        time.sleep(0.01)
    worst = max(worst, time.monotonic() - t0)
    print("\nshared visibility: worst %.2f s (bound %d s)" % (worst, SHARED_TIMEOUT))


# ---- key lifecycle across hosts ----

def test_shred_locks_both_mounts_within_poll_plus_1s(pair, keystore):
    a, b = pair
    write_file(a.path("s"), b"secret")
    assert read_file(b.path("s")) == b"secret"
    for m in pair:
        m.allow_errors = True       # the lock is logged as an error, by design
    t0 = time.monotonic()
    r = run([KEYFSCTL, "key", "destroy", "test", "--keystore", keystore])
    assert r.returncode == EXIT_OK, r
    deadline = t0 + 1.1 * POLL + 1.0 + SLACK
    pending = {a.mnt, b.mnt}
    while pending:
        for m in pair:
            if m.mnt in pending and control(m.mnt)["state"] == "locked":
                pending.discard(m.mnt)
        assert not pending or time.monotonic() < deadline, "not locked in time: %s" % sorted(pending)
        time.sleep(0.01)
    for m in pair:
        expect_errno(errno.EKEYREVOKED, read_file, m.path("s"))


def test_rewrap_by_one_host_is_followed_by_the_other(pair, keystore, shared_volume):
    a, b = pair
    files = {"f%d" % k: os.urandom(5000 + k) for k in range(6)}
    for name, data in files.items():
        write_file(a.path(name), data)
        assert read_file(b.path(name)) == data
    before = {h["key_version"] for h in inspect_json(*[a.bpath(n) for n in files])}
    r = run([KEYFSCTL, "key", "rotate", "test", "--keystore", keystore])
    assert r.returncode == EXIT_OK, r
    r = run([KEYFSCTL, "rewrap", "--keystore", keystore, shared_volume])
    assert r.returncode == EXIT_OK, r
    after = inspect_json(*[a.bpath(n) for n in files])
    assert {h["key_version"] for h in after}.isdisjoint(before)
    # Both daemons keep their cached keys (the DEK did not change) and write on.
    for name, data in files.items():
        with open(b.path(name), "r+b") as f:
            f.seek(10)
            f.write(b"B")
        with open(a.path(name), "r+b") as f:
            f.seek(4097)
            f.write(b"A")
        want = data[:10] + b"B" + data[11:4097] + b"A" + data[4098:]
        for m in pair:
            assert read_file(m.path(name)) == want
    r = run([KEYFSCTL, "fsck", "--keystore", keystore, shared_volume])
    assert r.returncode == EXIT_OK, r
