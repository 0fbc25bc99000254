# test_kms_concurrency.py: many Key Protect calls in flight: bounded by -o kms_concurrency, correct under faults, paced on 429, one unwrap per wrapped DEK
#
# What a user relies on, asserted from what the emulator saw: the calls in flight never exceed
# the option and do reach it; concurrent creates under drops, 5xx, 429 and slow calls give every
# file its own key and content; a rate-limited service slows the whole client down without a
# file lost; a file reached through hard links or by racing opens is unwrapped once; an unmount
# with dozens of calls hanging exits at once; several mounts of one key all lock within
# poll + 1 s of its deletion; a file the kernel forgot between its listing and its open is not
# unwrapped again (and a lock wipes the keys kept for it, a replaced file gets none); a token
# fetch that meets 503s does not stall the calls waiting for it; the pool tops up its floor with
# few calls; a burst's connections are closed at rest.
import collections
import json
import os
import subprocess
import threading
import time

import pytest

from helpers import FUSERMOUNT, KEYFS, KEYFSCTL, inspect_json, keyfsctl, read_file, run, wait_for, write_file
from kpemu import Emulator

HEADER_MIN = 512


class CountingEmulator(Emulator):
    """The emulator, also counting the wraps and unwraps being served at once (the peak), and
    which file (aad[1]) each successful one was for."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.inflight = 0
        self.peak = 0
        self.done = []          # (action, file id hex) of every wrap/unwrap answered 200
        self.counting = threading.local()

    def _action(self, role, kid, action, body):
        if action not in ("wrap", "unwrap"):
            return super()._action(role, kid, action, body)
        try:
            aad = json.loads(body or b"{}").get("aad")
        except ValueError:
            aad = None
        fid = aad[1] if isinstance(aad, list) and len(aad) == 2 else None
        out = super()._action(role, kid, action, body)
        with self.lock:
            self.done.append((action, fid))
        return out

    def _dispatch(self, h):
        gated = "/actions/wrap" in h.path or "/actions/unwrap" in h.path
        if gated:
            with self.lock:
                self.inflight += 1
                self.peak = max(self.peak, self.inflight)
        self.counting.open = gated
        try:
            return super()._dispatch(h)
        finally:
            self._call_ended()

    def _call_ended(self):
        if getattr(self.counting, "open", False):
            self.counting.open = False
            with self.lock:
                self.inflight -= 1

    def _send_raw(self, h, *a, **kw):
        # For the client the call ends with its answer: count it out before the answer goes, or a
        # client that sends its next call at once is seen with both in flight (this thread may be
        # scheduled again only after the next call arrived).
        self._call_ended()
        return super()._send_raw(h, *a, **kw)

    def reset_peak(self):
        with self.lock:
            self.peak = self.inflight

    def served(self, action):
        with self.lock:
            return [f for a, f in self.done if a == action]


@pytest.fixture
def emu(emu_factory):
    return emu_factory(CountingEmulator, key_name="keyfs-concurrency-root")


@pytest.fixture
def volume_kp(tmp_path, emu, apikey_file, kp_client_env):
    backing = str(tmp_path / "backing")
    keyfsctl("init", backing, "--kms", "keyprotect", "--endpoint", emu.url, "--instance", emu.instance,
             "--key", emu.kid, "--iam-endpoint", emu.url, "--apikey-file", apikey_file,
             "--ca-file", emu.ca_file)
    return backing


@pytest.fixture
def kp_mount(mount, volume_kp, apikey_file):
    def factory(*opts, backing=None, allow_errors=False):
        return mount(backing=backing or volume_kp, opts=["apikey_file=" + apikey_file, *opts],
                     allow_errors=allow_errors)
    return factory


def fill_dir(m, d, n):
    os.mkdir(m.path(d))
    data = {}
    for k in range(n):
        name = "%s/f%03d" % (d, k)
        data[name] = ("%s says %d " % (name, k)).encode() * (1 + k % 7)
        write_file(m.path(name), data[name])
    return data


def in_threads(n, fn):
    errors = []
    start = threading.Barrier(n)

    def body(k):
        try:
            start.wait()
            fn(k)
        except BaseException as e:          # noqa: B902 - reported below
            errors.append(e)
    ts = [threading.Thread(target=body, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), "a thread is still blocked after 120 s"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("n", [6, 24])
def test_unwraps_in_flight_reach_and_never_exceed_kms_concurrency(emu, kp_mount, n):
    m = kp_mount("dek_pool=0", "prefetch=0")
    data = fill_dir(m, "d", 60)
    m.umount()

    emu.set_latency(150)
    m = kp_mount("dek_pool=0", "kms_concurrency=%d" % n)
    emu.reset_peak()
    mark = len(emu.served("unwrap"))
    # The listing queues the 60 files; the prefetch unwraps them n - min(n/4, 4) at a time: calls
    # made ahead of need leave 4 slots (a quarter of a smaller window) to the ones someone waits
    # for (include/keyfs/kms.h, KMS_WAITED_SLOTS). (A file the
    # kernel forgets while queued, as it may under memory pressure, is unwrapped all the same:
    # its keys wait in the key cache for its open.)
    ahead = n - min(n // 4, 4)
    assert len(os.listdir(m.path("d"))) == 60
    wait_for(lambda: len(emu.served("unwrap")) - mark >= ahead, timeout=30, what="%d keys unwrapped ahead" % ahead)
    time.sleep(0.5)
    assert emu.peak == ahead
    for name, d in data.items():
        assert read_file(m.path(name)) == d
    assert emu.peak <= n
    # Each file's key once, whoever unwrapped it.
    assert sorted(emu.served("unwrap")[mark:]) == sorted(set(emu.served("unwrap")[mark:]))
    assert len(emu.served("unwrap")) - mark == 60
    m.umount()

    # Opens someone waits for get the whole window, as far as the daemon's 10 request threads
    # (fs/main.c) can wait at once: 2n readers at once, no prefetch.
    m = kp_mount("dek_pool=0", "prefetch=0", "kms_concurrency=%d" % n)
    emu.reset_peak()
    mark = len(emu.served("unwrap"))
    names = sorted(data)

    def reader(k):
        for name in names[k::2 * n]:
            assert read_file(m.path(name)) == data[name]
    in_threads(2 * n, reader)
    assert emu.peak == min(n, 10)
    assert sorted(emu.served("unwrap")[mark:]) == sorted(set(emu.served("unwrap")[mark:]))
    assert len(emu.served("unwrap")) - mark == 60


def test_concurrent_creates_under_faults_give_each_file_its_own_key(emu, kp_mount):
    emu.set_latency(20)
    # Dropped connections, 5xx, 429 with and without Retry-After, and slow calls, spread over
    # the wraps of 16 concurrent creators (no pool: each create wraps its own key).
    emu.add_fault("drop", count=4, skip=3, match="/actions/wrap")
    emu.add_fault("status", status=503, count=4, skip=10, match="/actions/wrap", retry_after="0")
    emu.add_fault("status", status=500, count=4, skip=20, match="/actions/wrap")
    emu.add_fault("status", status=429, count=4, skip=30, match="/actions/wrap")
    emu.add_fault("latency", ms=700, count=6, skip=40, match="/actions/wrap")
    m = kp_mount("dek_pool=0", "prefetch=0", "kms_concurrency=8")
    wmark = len(emu.served("wrap"))         # keyfsctl init's probe wrap is not a file's
    names = ["t%02d/f%02d" % (t, k) for t in range(16) for k in range(10)]
    for t in range(16):
        os.mkdir(m.path("t%02d" % t))

    def creator(t):
        for k in range(10):
            name = "t%02d/f%02d" % (t, k)
            write_file(m.path(name), name.encode() * (k + 1))
    in_threads(16, creator)
    # Every fault was met, and still every create worked, exactly one served wrap per file.
    assert [f.hits for f in emu.faults] == [4, 4, 4, 4, 6]
    docs = inspect_json(*[m.bpath(n) for n in names])
    ids = [d["file_id"] for d in docs]
    assert len(set(ids)) == 160
    assert len({d["wrapped_dek_sha256"] for d in docs}) == 160
    assert collections.Counter(emu.served("wrap")[wmark:]) == collections.Counter(ids)
    for n in names:
        assert read_file(m.path(n)) == n.encode() * (int(n[-2:]) + 1)
    m.umount()

    # A fresh mount: every file reads its own content, one unwrap each, under faults again.
    emu.add_fault("drop", count=3, skip=5, match="/actions/unwrap")
    emu.add_fault("status", status=502, count=3, skip=15, match="/actions/unwrap")
    emu.add_fault("latency", ms=700, count=4, skip=25, match="/actions/unwrap")
    mark = len(emu.served("unwrap"))
    m = kp_mount("dek_pool=0", "kms_concurrency=8")
    got = {}

    def reader(t):
        for k in range(10):
            name = "t%02d/f%02d" % (t, k)
            got[name] = read_file(m.path(name))
    in_threads(16, reader)
    assert got == {n: n.encode() * (int(n[-2:]) + 1) for n in names}
    assert collections.Counter(emu.served("unwrap")[mark:]) == collections.Counter(ids)


def test_429_slows_the_whole_client_and_loses_nothing(emu, kp_mount):
    emu.set_latency(10)
    emu.set_rate_limit(25, retry_after=1)
    m = kp_mount("kms_concurrency=32", "dek_pool=16")
    names = ["r%d/f%02d" % (t, k) for t in range(6) for k in range(10)]
    for t in range(6):
        os.mkdir(m.path("r%d" % t))

    def creator(t):
        for k in range(10):
            name = "r%d/f%02d" % (t, k)
            write_file(m.path(name), name.encode())
    in_threads(6, creator)
    assert emu.rate_limited > 0
    # The client said so, once per episode, and a 429 is no key state: the mount stays unlocked.
    assert "the service asks to slow down (HTTP 429)" in m.stderr()
    status = json.loads(keyfsctl("status", m.mnt, "--json").stdout)
    assert status["state"] == "unlocked"
    for n in names:
        assert os.path.getsize(m.bpath(n)) >= HEADER_MIN
    m.umount()
    m = kp_mount("kms_concurrency=32")
    for n in names:
        assert read_file(m.path(n)) == n.encode()
    assert len(inspect_json(*[m.bpath(n) for n in names])) == 60


@pytest.mark.parametrize("prefetch", ["prefetch=0", "prefetch=256"])
def test_one_unwrap_per_file_for_hard_links_and_racing_opens(emu, kp_mount, prefetch):
    m = kp_mount("dek_pool=0", "prefetch=0")
    os.mkdir(m.path("a"))
    os.mkdir(m.path("b"))
    write_file(m.path("a/one"), b"one" * 100)
    write_file(m.path("a/two"), b"two" * 100)
    for k in range(3):
        os.link(m.path("a/one"), m.path("b/one-%d" % k))
    (one_id, two_id), _ = ([d["file_id"] for d in inspect_json(m.bpath("a/one"), m.bpath("a/two"))], None)
    m.umount()

    emu.set_latency(200)
    m = kp_mount(prefetch)
    mark = len(emu.served("unwrap"))
    paths = ["a/one", "a/two"] + ["b/one-%d" % k for k in range(3)]

    def opener(t):
        p = paths[t % len(paths)]
        assert read_file(m.path(p)) == (b"two" if p == "a/two" else b"one") * 100
    in_threads(20, opener)
    # Twenty opens racing over five names of two files: two unwraps, one per wrapped DEK.
    assert sorted(emu.served("unwrap")[mark:]) == sorted([one_id, two_id])
    # And a listing afterwards unwraps nothing more.
    os.listdir(m.path("b"))
    time.sleep(0.3)
    assert sorted(emu.served("unwrap")[mark:]) == sorted([one_id, two_id])


def test_unmount_with_many_calls_hanging_exits_at_once(emu, kp_mount):
    m = kp_mount("dek_pool=0", "prefetch=0")
    fill_dir(m, "d", 80)
    m.umount()
    m = kp_mount("poll=1")
    # Every call from now on hangs for 25 s: the listing's 32 unwraps ahead, the pool's refills
    # and the poll are all stuck in one.
    wait_for(lambda: "keys for new files ready" in m.stderr(), what="the dek pool to fill")
    for k in range(8):
        write_file(m.path("new%d" % k), b"x")
    emu.add_fault("latency", ms=25000, count=-1, match="kms")
    emu.reset_peak()
    assert len(os.listdir(m.path("d"))) == 80
    wait_for(lambda: emu.peak >= 32, timeout=10, what="32 calls hanging")
    proc = m.proc
    t0 = time.monotonic()
    assert subprocess.run([FUSERMOUNT, "-u", m.mnt]).returncode == 0
    assert proc.wait(timeout=20) == 0
    took = time.monotonic() - t0
    m.proc = None
    assert took < 5, "daemon took %.1f s to exit after the unmount" % took


def test_mounts_on_one_key_all_lock_within_poll_plus_1s(emu, kp_mount, tmp_path, apikey_file):
    backings = []
    for k in range(6):
        b = str(tmp_path / ("vol%d" % k))
        keyfsctl("init", b, "--kms", "keyprotect", "--endpoint", emu.url, "--instance", emu.instance,
                 "--key", emu.kid, "--iam-endpoint", emu.url, "--apikey-file", apikey_file,
                 "--ca-file", emu.ca_file)
        backings.append(b)
    mounts = [kp_mount("poll=1", "dek_pool=4", backing=b, allow_errors=True) for b in backings]
    for k, m in enumerate(mounts):
        write_file(m.path("f"), b"mount %d" % k)
    for k, m in enumerate(mounts):
        assert read_file(m.path("f")) == b"mount %d" % k
    t0 = time.monotonic()
    emu.key_action(emu.kid, "delete")
    when = {}

    def all_locked():
        for k, m in enumerate(mounts):
            if k not in when and "locked (key-destroyed)" in m.stderr():
                when[k] = time.monotonic() - t0
        return len(when) == len(mounts)
    wait_for(all_locked, timeout=10, interval=0.02, what="every mount locked")
    # poll=1 is jittered by 10 %: each mount locks within 1.1 + 1 s (and a little slack).
    assert max(when.values()) < 2.1 + 0.4, when
    for m in mounts:
        with pytest.raises(OSError):
            read_file(m.path("f"))


def test_kms_concurrency_option_bounds(volume_kp, tmp_path, apikey_file):
    mnt = str(tmp_path / "m")
    os.mkdir(mnt)
    for bad in ("0", "129", "-1", "x", ""):
        r = run([KEYFS, volume_kp, mnt, "-f", "-o", "apikey_file=%s,kms_concurrency=%s" % (apikey_file, bad)])
        assert r.returncode == 2, (bad, r.stderr)
        assert "kms_concurrency" in r.stderr
    r = run([KEYFS, "--help"])
    assert "kms_concurrency=N" in r.stdout + r.stderr


def keyed(m):
    return json.loads(keyfsctl("status", m.mnt, "--json").stdout)["files_keyed"]


def forget_all(m):
    """Make the kernel forget every file inode of the mount (as memory pressure does), and wait
    until keyfs got the forgets: no file holds keys any more."""
    def dropped():
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        return keyed(m) == 0
    wait_for(dropped, timeout=20, interval=0.2, what="the kernel to forget every file")


def listed_then_forgotten(emu, kp_mount, dirs=4, per_dir=30):
    """A tree written on one mount; on a fresh one, listed, its keys unwrapped ahead, then
    forgotten by the kernel before any file is opened. Returns the mount, the data, the file ids
    by name and the unwrap mark before the listing."""
    m = kp_mount("dek_pool=0", "prefetch=0")
    data = {}
    for d in range(dirs):
        data.update(fill_dir(m, "d%d" % d, per_dir))
    names = sorted(data)
    ids = dict(zip(names, (d["file_id"] for d in inspect_json(*[m.bpath(n) for n in names]))))
    m.umount()

    emu.set_latency(20)
    m = kp_mount()
    mark = len(emu.served("unwrap"))
    for d in range(dirs):
        assert len(os.listdir(m.path("d%d" % d))) == per_dir
    wait_for(lambda: len(emu.served("unwrap")) - mark == len(names) and keyed(m) == len(names), timeout=30,
             what="every listed file's key unwrapped ahead")
    forget_all(m)
    return m, data, ids, mark


@pytest.mark.skipif(os.geteuid() != 0, reason="forcing the kernel to forget inodes needs root")
def test_one_unwrap_per_file_when_the_kernel_forgets_listed_files_before_the_open(emu, kp_mount):
    m, data, ids, mark = listed_then_forgotten(emu, kp_mount)
    # Every file read after the kernel forgot it: the keys unwrapped for the listing serve.
    for name, d in data.items():
        assert read_file(m.path(name)) == d
    assert collections.Counter(emu.served("unwrap")[mark:]) == collections.Counter(ids.values())
    # Forgotten again after the reads: read again, still no unwrap.
    forget_all(m)
    for name, d in data.items():
        assert read_file(m.path(name)) == d
    assert collections.Counter(emu.served("unwrap")[mark:]) == collections.Counter(ids.values())


@pytest.mark.skipif(os.geteuid() != 0, reason="forcing the kernel to forget inodes needs root")
def test_keys_kept_for_forgotten_files_are_wiped_by_a_lock(emu, kp_mount):
    m, data, ids, mark = listed_then_forgotten(emu, kp_mount, dirs=2, per_dir=25)
    keyfsctl("lock", m.mnt)
    wait_for(lambda: "kept keys of forgotten files" in m.stderr(), what="the lock's wipe")
    assert "50 kept keys of forgotten files" in m.stderr()
    keyfsctl("unlock", m.mnt)
    wait_for(lambda: json.loads(keyfsctl("status", m.mnt, "--json").stdout)["state"] == "unlocked",
             what="unlocked")
    for name, d in data.items():
        assert read_file(m.path(name)) == d
    # Nothing kept survived the lock: each file's key unwrapped once more.
    assert collections.Counter(emu.served("unwrap")[mark:]) == collections.Counter(list(ids.values()) * 2)


@pytest.mark.skipif(os.geteuid() != 0, reason="forcing the kernel to forget inodes needs root")
def test_a_file_replaced_while_forgotten_gets_no_stale_key(emu, kp_mount):
    m, data, ids, mark = listed_then_forgotten(emu, kp_mount, dirs=1, per_dir=20)
    # d0/f001's backing file, same inode, now holds d0/f002's bytes (header and all): its keys
    # kept since the kernel forgot it are not this header's.
    with open(m.bpath("d0/f002"), "rb") as f:
        other = f.read()
    ino = os.stat(m.bpath("d0/f001")).st_ino
    with open(m.bpath("d0/f001"), "r+b") as f:
        f.truncate(0)
        f.write(other)
    assert os.stat(m.bpath("d0/f001")).st_ino == ino
    assert read_file(m.path("d0/f001")) == data["d0/f002"]
    assert read_file(m.path("d0/f002")) == data["d0/f002"]
    # f002's key served f002 from the cache; f001's new header was unwrapped (f002's id).
    expect = list(ids.values()) + [ids["d0/f002"]]
    assert collections.Counter(emu.served("unwrap")[mark:]) == collections.Counter(expect)


def test_a_token_fetch_that_meets_503s_does_not_stall_the_calls_waiting_for_it(emu, kp_mount):
    # Two calls in flight at most; eight creators wrapping at once. The token expires, so the
    # first wrap to see a 401 fetches a new one, and IAM answers 503 three times first: the
    # other wraps wait for that token while holding their slots. The fetch must not queue for
    # a slot behind them (which would stall every wrap and the poller's token with them).
    m = kp_mount("dek_pool=0", "prefetch=0", "kms_concurrency=2", "poll=1")
    for t in range(8):
        os.mkdir(m.path("t%d" % t))
    write_file(m.path("first"), b"token cached")
    emu.set_latency(20)
    emu.expire_tokens()
    emu.add_fault("status", status=503, count=3, match="iam")
    done = []

    def creator(t):
        for k in range(5):
            write_file(m.path("t%d/f%d" % (t, k)), b"%d/%d" % (t, k))
        done.append(t)
    threads = [threading.Thread(target=creator, args=(t,), daemon=True) for t in range(8)]
    for th in threads:
        th.start()
    wait_for(lambda: len(done) == 8, timeout=20, what="every create, through the token fetch's 503s")
    assert emu.faults[0].hits == 3
    for t in range(8):
        for k in range(5):
            assert read_file(m.path("t%d/f%d" % (t, k))) == b"%d/%d" % (t, k)
    # The poller got its tokens too: the mount answers polls and stays unlocked.
    since = time.time()
    wait_for(lambda: any(e["t"] >= since and e["status"] == 200 for e in emu.requests(kind="kms", path="/metadata")),
             timeout=5, what="a poll answered after the fetch")
    assert json.loads(keyfsctl("status", m.mnt, "--json").stdout)["state"] == "unlocked"


def established(pid, port):
    """TCP connections process pid has established to port."""
    socks = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            socks.add(link[8:-1])
    n = 0
    for table in ("tcp", "tcp6"):
        with open("/proc/%d/net/%s" % (pid, table)) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in socks:
                    n += 1
    return n


def test_a_burst_of_calls_leaves_one_or_two_connections_at_rest(emu, kp_mount):
    m = kp_mount("dek_pool=0", "prefetch=0")
    data = fill_dir(m, "d", 60)
    m.umount()
    emu.set_latency(150)
    m = kp_mount("dek_pool=0", "kms_concurrency=12", "poll=1")
    port = int(emu.url.rsplit(":", 1)[1].split("/")[0])
    mark = len(emu.served("unwrap"))
    peak = [0]

    def unwrapped_all():
        peak[0] = max(peak[0], established(m.proc.pid, port))
        return len(emu.served("unwrap")) - mark == 60
    assert len(os.listdir(m.path("d"))) == 60
    wait_for(unwrapped_all, timeout=30, what="the listing's keys unwrapped")
    # Nine calls in flight (12 less the 3 kept for calls someone waits for), each on its own connection; at
    # rest, after 10 s unused, the polls keep two of them.
    assert peak[0] >= 9
    wait_for(lambda: established(m.proc.pid, port) <= 2, timeout=20, interval=0.2,
             what="the burst's connections closed")
    for name, d in data.items():
        assert read_file(m.path(name)) == d


def test_the_pool_tops_up_with_few_calls_and_refills_a_burst_with_the_window(emu, kp_mount):
    emu.set_latency(100)
    emu.reset_peak()
    mark = len(emu.served("wrap"))
    m = kp_mount("kms_concurrency=32", "poll=1", "prefetch=0")
    # Filling its floor of 32 at start is nobody's wait: four wraps at a time.
    wait_for(lambda: "32 keys for new files ready" in m.stderr(), timeout=30, what="the pool full")
    assert len(emu.served("wrap")) - mark == 32
    assert emu.peak == 4
    # So is the refill after an unlock (the lock wiped the pool).
    keyfsctl("lock", m.mnt)
    wait_for(lambda: "pooled keys wiped" in m.stderr(), what="the lock")
    emu.reset_peak()
    mark = len(emu.served("wrap"))
    keyfsctl("unlock", m.mnt)
    wait_for(lambda: len(emu.served("wrap")) - mark == 32, timeout=30, what="the pool refilled after the unlock")
    assert emu.peak == 4
    # Creates that outrun the pool get the whole window.
    for t in range(8):
        os.mkdir(m.path("t%d" % t))

    def creator(t):
        for k in range(20):
            write_file(m.path("t%d/f%d" % (t, k)), b"%d" % k)
    in_threads(8, creator)
    assert emu.peak > 4
    # A lock ends the burst and the pool's growth: the refill after the unlock is four at a time
    # again, up to the floor (a stalled service must not find the whole window taken by the pool).
    keyfsctl("lock", m.mnt)
    wait_for(lambda: m.stderr().count("pooled keys wiped") == 2, what="the second lock")
    wait_for(lambda: emu.inflight == 0, what="the burst's wraps in flight to end")
    emu.reset_peak()
    mark = len(emu.served("wrap"))
    keyfsctl("unlock", m.mnt)
    wait_for(lambda: len(emu.served("wrap")) - mark >= 32, timeout=30, what="the pool refilled after the second unlock")
    time.sleep(0.5)
    assert len(emu.served("wrap")) - mark == 32
    assert emu.peak == 4


def test_an_open_finds_a_slot_while_the_pools_wraps_hang(emu, kp_mount):
    # Calls made ahead of need leave a quarter of a small window free (include/keyfs/kms.h,
    # kms_thread_ahead): with a window of 4, the pool's refill gets 3 and an open's unwrap the
    # fourth, even while every wrap hangs.
    m = kp_mount("kms_concurrency=4", "prefetch=0")
    wait_for(lambda: "32 keys for new files ready" in m.stderr(), timeout=30, what="the pool full")
    data = b"waited for " * 100
    write_file(m.path("f"), data)
    keyfsctl("lock", m.mnt)                 # wipes the file keys and the pool
    wait_for(lambda: "pooled keys wiped" in m.stderr(), what="the lock")
    wait_for(lambda: emu.inflight == 0, what="the refill's wraps in flight to end")
    emu.add_fault("latency", ms=60000, count=-1, match="/actions/wrap")
    try:
        emu.reset_peak()
        unwraps = len(emu.served("unwrap"))
        keyfsctl("unlock", m.mnt)
        wait_for(lambda: emu.inflight == 3, what="the refill's 3 wraps to hang")
        time.sleep(0.3)
        assert (emu.inflight, emu.peak) == (3, 3)
        out = []
        reader = threading.Thread(target=lambda: out.append(read_file(m.path("f"))), daemon=True)
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "the open waits behind the pool's hanging wraps"
        assert out == [data]
        assert len(emu.served("unwrap")) - unwraps == 1
        assert emu.peak == 4
    finally:
        emu.clear_faults()


def test_a_listing_longer_than_the_window_is_unwrapped_ahead_all_the_way(emu, kp_mount):
    m = kp_mount("dek_pool=0", "prefetch=0")
    data = fill_dir(m, "big", 40)
    ids = {n: d["file_id"] for n, d in zip(sorted(data), inspect_json(*[m.bpath(n) for n in sorted(data)]))}
    m.umount()

    m = kp_mount("dek_pool=0", "prefetch=8")
    mark = len(emu.served("unwrap"))
    names = ["big/" + n for n in os.listdir(m.path("big"))]
    assert sorted(names) == sorted(data)

    def unwrapped():
        return emu.served("unwrap")[mark:]
    # The listing alone: the window, the first 8 in listing order.
    wait_for(lambda: len(unwrapped()) >= 8, what="the window unwrapped ahead")
    assert sorted(unwrapped()) == sorted(ids[n] for n in names[:8])
    # Read in listing order (find | xargs cat, tar c): each file opened slides the window by one,
    # so every file's key is unwrapped before its open, and 8 ahead of the reader, to the end.
    for k, n in enumerate(names):
        wait_for(lambda: ids[n] in unwrapped(), what="the key of %s unwrapped before its open" % n)
        assert read_file(m.path(n)) == data[n]
        want = min(len(names), 8 + k + 1)
        wait_for(lambda: len(unwrapped()) >= want, what="the window slid to %d files" % want)
        assert sorted(unwrapped()) == sorted(ids[x] for x in names[:want])
    # One unwrap per file, none twice.
    assert collections.Counter(unwrapped()) == collections.Counter(ids.values())


def status_doc(mnt):
    r = run([KEYFSCTL, "status", mnt, "--json"])
    assert r.stderr == "", r
    return r.returncode, json.loads(r.stdout)


def test_status_counts_the_wraps_and_unwraps_and_their_failures(emu, kp_mount):
    # No pool and no prefetch: every wrap is a create's, every unwrap an open's.
    m = kp_mount("dek_pool=0", "prefetch=0")
    wraps = emu.kms_calls().get("wrap", 0)
    for k in range(3):
        write_file(m.path("f%d" % k), b"file %d" % k)
    rc, doc = status_doc(m.mnt)
    assert rc == 0 and (doc["kms_wraps"], doc["kms_unwraps"], doc["kms_key_errors"]) == (3, 0, 0), doc
    assert emu.kms_calls().get("wrap", 0) - wraps == 3
    text = run([KEYFSCTL, "status", m.mnt]).stdout
    assert "key service: 3 wraps, 0 unwraps, 0 failed\n" in text, text
    m.umount()

    m = kp_mount("dek_pool=0", "prefetch=0", allow_errors=True)
    assert read_file(m.path("f0")) == b"file 0" and read_file(m.path("f1")) == b"file 1"
    # Polls hang from now on: only the refused unwrap can tell the mount the key is suspended.
    emu.add_fault("latency", ms=25000, count=-1, match="/metadata")
    emu.key_action(emu.kid, "disable")
    try:
        with pytest.raises(OSError):
            read_file(m.path("f2"))
        rc, doc = status_doc(m.mnt)
        assert rc == 8 and doc["state"] == "locked", doc
        assert (doc["kms_wraps"], doc["kms_unwraps"], doc["kms_key_errors"]) == (0, 3, 1), doc
        prom = run([KEYFSCTL, "status", "--prometheus"]).stdout
        mine = [l for l in prom.splitlines() if 'mountpoint="%s"' % os.path.realpath(m.mnt) in l]
        assert any(l.startswith("keyfs_kms_unwraps_total{") and l.endswith("} 3") for l in mine), mine
        assert any(l.startswith("keyfs_kms_key_errors_total{") and l.endswith("} 1") for l in mine), mine
    finally:
        emu.clear_faults()
        emu.key_action(emu.kid, "enable")
