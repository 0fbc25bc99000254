# test_dekpool.py: KMS round trips keyfs saves against Key Protect: keys for new files wrapped ahead, keys of listed files unwrapped ahead
#
# What a user relies on, asserted from what the emulator saw rather than from timings: every
# file gets its own file id and DEK; a create with a full pool makes no KMS call (its key was
# wrapped before the create began); a file's DEK is unwrapped once per mount however it is
# reached; a directory listing unwraps its files' keys before they are opened, within the
# bound; a key the service refuses makes creates fail with ENOKEY, not spin; and the pool is
# wiped at unmount.
import collections
import errno
import json
import os
import re
import secrets

import pytest

from helpers import inspect_json, keyfsctl, read_file, wait_for, write_file
from kpemu import Emulator

POOL = 32               # the documented default of -o dek_pool= for Key Protect
READY = re.compile(r"dek pool: (\d+) keys for new files ready")
WIPED = re.compile(r"dek pool: (\d+) unused keys for new files wiped")


class RecordingEmulator(Emulator):
    """The emulator, also noting the associated data of every wrap and unwrap it is asked for:
    aad = [volume uuid, file id hex], so each call names the file it is for."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []         # (action, file id hex or None), in arrival order

    def _action(self, role, kid, action, body):
        if action in ("wrap", "unwrap"):
            try:
                aad = json.loads(body or b"{}").get("aad")
            except ValueError:
                aad = None
            fid = aad[1] if isinstance(aad, list) and len(aad) == 2 else None
            with self.lock:
                self.calls.append((action, fid))
        return super()._action(role, kid, action, body)

    def mark(self):
        with self.lock:
            return len(self.calls)

    def since(self, mark, action):
        """File ids of the `action` calls after mark, in order."""
        with self.lock:
            return [fid for a, fid in self.calls[mark:] if a == action]

    def before(self, mark, action):
        with self.lock:
            return [fid for a, fid in self.calls[:mark] if a == action]


@pytest.fixture
def emu(emu_factory):
    return emu_factory(RecordingEmulator, key_name="keyfs-pool-root")


@pytest.fixture
def kp_volume(tmp_path, emu, apikey_file):
    backing = str(tmp_path / "backing")
    keyfsctl("init", backing, "--kms", "keyprotect", "--endpoint", emu.url, "--instance", emu.instance,
             "--key", emu.kid, "--iam-endpoint", emu.url, "--apikey-file", apikey_file,
             "--ca-file", emu.ca_file)
    # init proves a wrap and an unwrap with a test key: not a file's.
    with emu.lock:
        emu.calls.clear()
    return backing


@pytest.fixture
def kp_mount(mount, kp_volume, apikey_file):
    """mount(*opts, allow_errors=False): the Key Protect volume with the API key file."""
    def factory(*opts, allow_errors=False):
        return mount(backing=kp_volume, opts=["apikey_file=" + apikey_file, *opts], allow_errors=allow_errors)
    return factory


def log_matches(m, pattern):
    return [int(x) for x in pattern.findall(m.stderr())]


def file_ids(m, names):
    docs = inspect_json(*[m.bpath(n) for n in names])
    return [d["file_id"] for d in docs], [d["wrapped_dek_sha256"] for d in docs]


def test_creates_take_keys_wrapped_ahead(emu, kp_mount):
    m = kp_mount()
    # The pool fills at mount; the daemon says once when it is full.
    wait_for(lambda: log_matches(m, READY), what="the dek pool to fill")
    assert log_matches(m, READY) == [POOL]
    mark = emu.mark()
    made_ahead = emu.before(mark, "wrap")
    assert len(made_ahead) == POOL
    assert emu.before(mark, "unwrap") == []

    names = ["f%02d" % k for k in range(20)]
    data = {n: secrets.token_bytes(100 + k) for k, n in enumerate(names)}
    for n in names:
        write_file(m.path(n), data[n])
    ids, wrapped = file_ids(m, names)

    # One file id and one DEK per file, and each of them wrapped before the first create.
    assert len(set(ids)) == len(names)
    assert len(set(wrapped)) == len(names)
    assert set(ids) <= set(made_ahead)
    # The creates made no unwrap, and the pool's refills wrapped keys for other, future files.
    assert emu.since(mark, "unwrap") == []
    assert not set(emu.since(mark, "wrap")) & set(ids)
    # No key was ever wrapped for two files.
    every_wrap = emu.before(emu.mark(), "wrap")
    assert collections.Counter(every_wrap).most_common(1)[0][1] == 1

    m.umount()
    # The unused keys are wiped at unmount: the pool held 12 after 20 creates, plus refills.
    wiped = log_matches(m, WIPED)
    assert len(wiped) == 1 and wiped[0] <= POOL

    m.start()
    wait_for(lambda: log_matches(m, READY), what="the dek pool to fill again")
    mark = emu.mark()
    for n in names:
        assert read_file(m.path(n)) == data[n]
    # Each file's DEK was unwrapped exactly once, whether by the listing's prefetch or the open.
    unwrapped = collections.Counter(emu.since(mark, "unwrap"))
    assert unwrapped == collections.Counter(ids)
    # The keys stay while the kernel knows the files: closing and reopening costs no KMS call.
    mark = emu.mark()
    for n in names:
        assert read_file(m.path(n)) == data[n]
    assert emu.since(mark, "unwrap") == []
    m.umount()
    assert log_matches(m, WIPED) == [POOL]


def test_pool_off_wraps_at_create(emu, kp_mount):
    m = kp_mount("dek_pool=0", "prefetch=0")
    assert emu.before(emu.mark(), "wrap") == []
    for k in range(5):
        mark = emu.mark()
        write_file(m.path("g%d" % k), b"x" * k)
        (fid,), _ = file_ids(m, ["g%d" % k])
        # Exactly one wrap, for this file, made by the create itself.
        assert emu.since(mark, "wrap") == [fid]
    m.umount()
    assert log_matches(m, WIPED) == []


def test_listing_unwraps_ahead(emu, kp_mount):
    m = kp_mount("dek_pool=0", "prefetch=0")
    os.mkdir(m.path("d"))
    names = ["file-%03d" % k for k in range(50)]
    for n in names:
        write_file(m.path("d", n), n.encode() * 3)
    ids = dict(zip(names, file_ids(m, ["d/" + n for n in names])[0]))
    m.umount()

    m = kp_mount()              # prefetch on: the Key Protect default
    mark = emu.mark()
    listed = os.listdir(m.path("d"))
    assert sorted(listed) == names
    # The listing alone unwraps the 50 keys, each once...
    wait_for(lambda: len(emu.since(mark, "unwrap")) >= 50, what="50 keys unwrapped ahead")
    assert collections.Counter(emu.since(mark, "unwrap")) == collections.Counter(ids.values())
    # ... so that reading every file then costs no KMS call at all.
    mark = emu.mark()
    for n in names:
        assert read_file(m.path("d", n)) == n.encode() * 3
    assert emu.since(mark, "unwrap") == []


def test_listing_prefetch_is_bounded(emu, kp_mount):
    m = kp_mount("dek_pool=0", "prefetch=0")
    os.mkdir(m.path("big"))
    os.mkdir(m.path("barrier"))
    names = ["n%02d" % k for k in range(40)]
    for n in names:
        write_file(m.path("big", n), n.encode())
    write_file(m.path("barrier", "last"), b"last")
    ids = dict(zip(names, file_ids(m, ["big/" + n for n in names])[0]))
    (barrier_id,), _ = file_ids(m, ["barrier/last"])
    m.umount()

    m = kp_mount("prefetch=16")
    mark = emu.mark()
    order = os.listdir(m.path("big"))
    # Files are unwrapped ahead in listing order, first in first out: once the next listing's
    # file is done, whatever the first listing queued has been taken up, though with several
    # workers an earlier file may still be on its way: wait for it too. More than 16 ahead would
    # show here, or as a missing unwrap at open below.
    os.listdir(m.path("barrier"))
    wait_for(lambda: barrier_id in emu.since(mark, "unwrap") and len(emu.since(mark, "unwrap")) >= 17,
             what="the barrier file's key and 16 ahead")
    ahead = [f for f in emu.since(mark, "unwrap") if f != barrier_id]
    assert sorted(ahead) == sorted(ids[n] for n in order[:16])
    # Every other file is unwrapped when opened, once.
    mark = emu.mark()
    for n in names:
        assert read_file(m.path("big", n)) == n.encode()
    assert sorted(emu.since(mark, "unwrap")) == sorted(ids[n] for n in order[16:])


def test_no_prefetch_when_off(emu, kp_mount):
    m = kp_mount("dek_pool=0", "prefetch=0")
    os.mkdir(m.path("d"))
    for k in range(10):
        write_file(m.path("d", "f%d" % k), b"%d" % k)
    m.remount()
    mark = emu.mark()
    assert len(os.listdir(m.path("d"))) == 10
    assert read_file(m.path("d", "f3")) == b"3"
    # No key of the listing was fetched but the one that was read.
    (fid,), _ = file_ids(m, ["d/f3"])
    assert emu.since(mark, "unwrap") == [fid]


def test_refused_wraps_fail_creates_and_back_off(emu, kp_mount):
    # The service refuses every wrap (403: access revoked) from the start.
    emu.add_fault("status", status=403, count=-1, match="/actions/wrap")
    m = kp_mount("dek_pool=8", "poll=1", allow_errors=True)
    wait_for(lambda: "cannot make keys for new files ahead" in m.stderr(), what="the pool's warning")
    # The workers back off (1 s, 2 s, ...) instead of retrying at once: one warning per outage,
    # and a handful of attempts, not thousands.
    def refused():
        return len([e for e in emu.requests(kind="kms", path="/actions/wrap") if e["fault"]])
    # The workers probe one at a time, 1 s after the first failure, then 2 s later, 4 s later...
    first = refused()
    wait_for(lambda: refused() >= first + 2, what="two probes after a backoff")
    assert m.stderr().count("cannot make keys for new files ahead") == 1
    assert refused() < 20
    # A create falls back to a wrap of its own, which fails with the key's errno; no file is left.
    # That refusal locks the mount (access-revoked, docs/LOCKING.md): the workers stop.
    with pytest.raises(OSError) as ei:
        write_file(m.path("refused"), b"data")
    assert ei.value.errno == errno.ENOKEY
    assert not os.path.exists(m.bpath("refused"))
    assert not os.path.exists(m.path("refused"))
    wait_for(lambda: "locked (access-revoked)" in m.stderr(), timeout=2, what="the access-revoked lock")

    # Access restored: the next poll's probe unlocks the mount, the pool fills up again, creates work.
    emu.clear_faults()
    wait_for(lambda: "unlocked: key" in m.stderr(), timeout=3, what="the unlock")
    wait_for(lambda: log_matches(m, READY), what="the dek pool to fill")
    assert log_matches(m, READY) == [8]
    assert "making keys for new files ahead again" in m.stderr()
    # The create takes a pooled key; the pool refills only below its low mark (6), so 7 are left.
    write_file(m.path("works"), b"data")
    assert read_file(m.path("works")) == b"data"
    m.umount()
    assert log_matches(m, WIPED) == [7]


def test_bad_option_values(kp_volume, tmp_path):
    from helpers import KEYFS, run
    mnt = tmp_path / "mnt-bad"
    mnt.mkdir()
    for opt in ("dek_pool=1025", "dek_pool=-1", "dek_pool=", "prefetch=abc", "prefetch=1025"):
        r = run([KEYFS, kp_volume, str(mnt), "-f", "-o", opt])
        assert r.returncode == 2, (opt, r.stderr)
        assert "mount option '%s'" % opt.split("=")[0] in r.stderr
