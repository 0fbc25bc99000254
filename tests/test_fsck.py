# test_fsck.py: keyfsctl fsck: clean, damaged (named by file and plaintext offset) and could-not-check, told apart by exit code
import json
import os
import secrets
import shutil
import threading

import pytest

from helpers import (CHUNK, CIPHER_ID, EXIT_CONFIG, EXIT_DAMAGED, EXIT_IO, EXIT_KMS, EXIT_LOCKED, EXIT_OK,
                     EXIT_USAGE, FORMAT, HEADER_AREA, HEADER_SIZE, KEYFSCTL, LAYOUT, backing_size,
                     flip, init_keyprotect, inspect_json, keyfsctl, read_file, run, run_stderr_on_tty,
                     write_file)
from layout import zero_chunk

GEN_OFFSET = 36                     # header generation, u32 LE (docs/FORMAT.md)
TAG_OFFSET = 992                    # header tag, 32 bytes


def fsck(backing, *extra):
    return run([KEYFSCTL, "fsck", *extra, backing])


def fsck_json(backing, *extra):
    r = fsck(backing, "--json", *extra)
    return r, json.loads(r.stdout)


def summary(files, nbytes, damaged=0, not_checked=0, changed=0):
    return ("checked %d files, %d plaintext bytes: %d damaged, %d not checked, %d changed while checking"
            % (files, nbytes, damaged, not_checked, changed))


def key_id(backing):
    with open(os.path.join(backing, ".keyfs")) as f:
        for line in f:
            if line.startswith("key_id="):
                return line.strip().split("=", 1)[1]
    raise AssertionError("no key_id in %s/.keyfs" % backing)


def make_tree(m):
    """An empty file, a sub-chunk file, a multi-chunk file, a sparse file with holes, a
    symlink and an empty dir. Returns the plaintext bytes of its 4 files."""
    write_file(m.path("empty"), b"")
    write_file(m.path("small.txt"), b"s" * 100)
    os.makedirs(m.path("d", "e"))
    os.mkdir(m.path("emptydir"))
    write_file(m.path("d", "multi.bin"), os.urandom(3 * CHUNK + 123))
    with open(m.path("d", "e", "sparse"), "wb") as f:
        f.truncate(1 << 20)
        f.seek(300000)
        f.write(b"x" * 10)
        f.seek(1 << 20)
        f.write(b"tail!")
    os.symlink("small.txt", m.path("link"))
    return 0 + 100 + (3 * CHUNK + 123) + (1 << 20) + 5


@pytest.fixture
def tree_volume(volume, mount):
    m = mount()
    total = make_tree(m)
    m.umount()
    return volume, total


def test_clean_tree(tree_volume):
    backing, total = tree_volume
    sparse = os.stat(os.path.join(backing, "d", "e", "sparse"))
    assert sparse.st_size == backing_size((1 << 20) + 5)
    assert sparse.st_blocks * 512 < sparse.st_size // 2, "the sparse file has no holes in the backing dir"
    r = fsck(backing)
    assert r.returncode == EXIT_OK, r
    assert r.stdout == summary(4, total) + "\n"
    # stderr is not a terminal: no progress, nothing at all.
    assert r.stderr == ""
    r, doc = fsck_json(backing)
    assert r.returncode == EXIT_OK, r
    assert r.stderr == ""
    assert doc == {"backing": os.path.realpath(backing), "files_checked": 4, "bytes_checked": total,
                   "damaged": [], "notes": [], "not_checked": [], "changed": [], "stopped": None,
                   "result": "clean"}


def test_flipped_chunk_byte_names_file_and_offset(tree_volume):
    backing, total = tree_volume
    flip(os.path.join(backing, "d", "multi.bin"), LAYOUT.data_offset(2) + 100)
    r = fsck(backing)
    assert r.returncode == EXIT_DAMAGED, r
    assert r.stdout.splitlines() == [
        "damaged: d/multi.bin: chunk 2 (plaintext bytes 8192-12287) does not authenticate",
        summary(4, total, damaged=1),
    ]
    assert r.stderr == "keyfsctl: error: volume '%s' has 1 damaged file\n" % os.path.realpath(backing)


def test_flipped_chunk_byte_json(tree_volume):
    backing, total = tree_volume
    flip(os.path.join(backing, "d", "multi.bin"), LAYOUT.data_offset(2) + 100)
    # The last, partial chunk too: its plaintext length is what "length" says.
    flip(os.path.join(backing, "d", "multi.bin"), LAYOUT.data_offset(3) + 7)
    r, doc = fsck_json(backing)
    assert r.returncode == EXIT_DAMAGED, r
    assert doc == {
        "backing": os.path.realpath(backing),
        "files_checked": 4,
        "bytes_checked": total,
        "damaged": [{"path": "d/multi.bin", "problems": [
            {"kind": "chunk", "chunk": 2, "offset": 8192, "length": 4096},
            {"kind": "chunk", "chunk": 3, "offset": 12288, "length": 123},
        ]}],
        "notes": [],
        "not_checked": [],
        "changed": [],
        "stopped": None,
        "result": "damaged",
    }


def test_damaged_chunks_listed_up_to_ten(volume, mount):
    m = mount()
    write_file(m.path("f"), os.urandom(20 * CHUNK))
    m.umount()
    for i in range(3, 18):
        flip(m.bpath("f"), LAYOUT.data_offset(i) + CHUNK - 1, 0x80)
    r = fsck(volume)
    assert r.returncode == EXIT_DAMAGED, r
    assert r.stdout.splitlines() == [
        "damaged: f: chunk %d (plaintext bytes %d-%d) does not authenticate" % (i, i * CHUNK, (i + 1) * CHUNK - 1)
        for i in range(3, 13)] + ["damaged: f: ... and 5 more chunks do not authenticate", summary(1, 20 * CHUNK, 1)]
    r, doc = fsck_json(volume)
    problems = doc["damaged"][0]["problems"]
    assert [p["chunk"] for p in problems[:10]] == list(range(3, 13))
    assert problems[10:] == [{"kind": "more_chunks", "count": 5}]


def test_a_zeroed_chunk_is_a_hole_not_damage(volume, mount):
    # docs/FORMAT.md: an all-zero full chunk reads as a hole; fsck cannot and does not tell.
    m = mount()
    write_file(m.path("f"), os.urandom(3 * CHUNK))
    m.umount()
    zero_chunk(m.bpath("f"), 1)
    r = fsck(volume)
    assert (r.returncode, r.stdout) == (EXIT_OK, summary(1, 3 * CHUNK) + "\n"), r


@pytest.mark.parametrize("where,message", [
    ("tag", "no header slot authenticates"),
    ("magic", "no header slot parses"),
    ("wrapped", "wrapped key does not unwrap with this volume's key (damaged, or copied from another volume)"),
])
def test_header_damaged(volume, mount, where, message):
    m = mount()
    write_file(m.path("a"), b"a" * 5000)
    write_file(m.path("b"), b"b" * 10)
    m.umount()
    p = m.bpath("a")
    hdr = read_file(p)[:HEADER_SIZE]
    # Slot 0 holds the header, slot 1 is still zero (never rewritten).
    assert read_file(p)[HEADER_SIZE:HEADER_AREA] == bytes(HEADER_AREA - HEADER_SIZE)
    lk, lv = hdr[32], hdr[33]
    off = {"tag": TAG_OFFSET + 5, "magic": 0, "wrapped": 40 + lk + lv + 50}[where]
    flip(p, off)
    r = fsck(volume)
    assert r.returncode == EXIT_DAMAGED, r
    # The file's chunks cannot be opened without its key: its bytes are not counted.
    assert r.stdout.splitlines() == ["damaged: a: " + message, summary(2, 10, damaged=1)]
    r, doc = fsck_json(volume)
    kind = "key" if where == "wrapped" else "header"
    problem = {"kind": kind, "error": message}
    if kind == "key":
        problem["key"] = key_id(volume)
    assert doc["damaged"] == [{"path": "a", "problems": [problem]}]


def test_one_header_slot_damaged_is_a_note(volume, mount):
    m = mount()
    data = os.urandom(2 * CHUNK + 1)
    write_file(m.path("f"), data)
    write_file(m.path("g"), b"g")
    m.umount()
    p = m.bpath("f")
    # Garbage in the unused slot (a torn rewrite leaves this): the daemon reads slot 0.
    with open(p, "r+b") as f:
        f.seek(HEADER_SIZE + 100)
        f.write(b"torn")
    r = fsck(volume)
    assert r.returncode == EXIT_OK, r
    assert r.stdout.splitlines() == ["note: f: header slot 1 does not parse; slot 0 (generation 1) serves",
                                     summary(2, len(data) + 1)]
    assert r.stderr == ""
    r, doc = fsck_json(volume)
    assert r.returncode == EXIT_OK
    assert doc["notes"] == [{"path": "f", "note": "header slot 1 does not parse; slot 0 (generation 1) serves"}]
    assert doc["result"] == "clean"
    m.start()
    assert read_file(m.path("f")) == data


def test_after_rotation_and_rewrap_both_slots_are_checked(volume, keystore, mount):
    # The daemon logs an error when the newest slot does not open and it falls back.
    m = mount(allow_errors=True)
    data = os.urandom(CHUNK + 7)
    write_file(m.path("f"), data)
    m.umount()
    keyfsctl("key", "rotate", "test", "--keystore", keystore)
    p = m.bpath("f")
    slot0 = read_file(p)[:HEADER_SIZE]
    keyfsctl("rewrap", volume)
    # rewrap clears the old slot once the new one is durable; a crash in between leaves both.
    assert read_file(p)[:HEADER_SIZE] == bytes(HEADER_SIZE)
    with open(p, "r+b") as f:
        f.write(slot0)
    assert [int.from_bytes(read_file(p)[s * HEADER_SIZE + GEN_OFFSET:][:4], "little") for s in (0, 1)] == [1, 2]
    # Both slots hold the one DEK: the older one authenticates too, and nothing is said.
    r = fsck(volume)
    assert (r.returncode, r.stdout) == (EXIT_OK, summary(1, len(data)) + "\n"), r
    orig = read_file(p)

    # The older slot damaged: a note; the newer one: a note too (the daemon falls back to the older).
    for slot, note in [(0, "header slot 0 (generation 1) does not authenticate; slot 1 (generation 2) serves"),
                       (1, "header slot 1 (generation 2) does not authenticate; slot 0 (generation 1) serves")]:
        write_file(p, orig)
        flip(p, slot * HEADER_SIZE + TAG_OFFSET)
        r = fsck(volume)
        assert r.returncode == EXIT_OK, r
        assert r.stdout.splitlines() == ["note: f: " + note, summary(1, len(data))]
        m.start()
        assert read_file(m.path("f")) == data
        m.umount()

    # Both damaged: damage.
    write_file(p, orig)
    flip(p, TAG_OFFSET)
    flip(p, HEADER_SIZE + TAG_OFFSET)
    r = fsck(volume)
    assert r.returncode == EXIT_DAMAGED, r
    assert r.stdout.splitlines() == ["damaged: f: no header slot authenticates", summary(1, 0, damaged=1)]


# v1: the cut sizes at chunk 1, 2; v2: chunk 1 and 2 live in group 0, so the size-only cut is
# inside the tag page of group 1 (chunk 128), and the file is made longer to have one.
CUT_FILE = 3 * CHUNK + 100 if FORMAT == 1 else 130 * CHUNK + 100
CUT_CHUNK = 1 if FORMAT == 1 else 128
CUT_SIZE = LAYOUT.chunk_offset(1) + 20 if FORMAT == 1 else LAYOUT.group_offset(1) + 20
SHORT_SIZE = LAYOUT.data_offset(2) + (1000 - 24 if FORMAT == 1 else 960)


@pytest.mark.parametrize("cut,line", [
    # Inside chunk 1's nonce and tag (v1), or the tag page of group 1 (v2): no valid file has this size.
    (CUT_SIZE, "damaged: f: backing size %d is cut inside chunk %d (plaintext offset %d)"
     % (CUT_SIZE, CUT_CHUNK, CUT_CHUNK * CHUNK)),
    # A size a shorter file could have: the shortened chunk does not authenticate.
    (SHORT_SIZE, "damaged: f: chunk 2 (plaintext bytes 8192-9151) does not authenticate"),
    (1000, "damaged: f: backing size 1000 is shorter than the keyfs header area (%d bytes)" % HEADER_AREA),
])
def test_truncated_backing_file(volume, mount, cut, line):
    m = mount()
    write_file(m.path("f"), os.urandom(3 * CHUNK + 100 if cut == SHORT_SIZE else CUT_FILE))
    m.umount()
    os.truncate(m.bpath("f"), cut)
    r = fsck(volume)
    assert r.returncode == EXIT_DAMAGED, r
    checked = {CUT_SIZE: CUT_CHUNK * CHUNK, SHORT_SIZE: 2 * CHUNK + 960, 1000: 0}[cut]
    assert r.stdout.splitlines() == [line, summary(1, checked, damaged=1)]


def test_truncated_json(volume, mount):
    m = mount()
    write_file(m.path("f"), os.urandom(CUT_FILE))
    m.umount()
    cut = CUT_SIZE + 20
    os.truncate(m.bpath("f"), cut)
    r, doc = fsck_json(volume)
    assert r.returncode == EXIT_DAMAGED
    assert doc["damaged"] == [{"path": "f", "problems": [
        {"kind": "size", "backing_size": cut, "chunk": CUT_CHUNK, "offset": CUT_CHUNK * CHUNK}]}]


def test_file_copied_from_another_volume(volume, keystore, mount, tmp_path):
    other = str(tmp_path / "other")
    keyfsctl("init", other, "--kms", "local", "--keystore", keystore, "--key", "other", "--create-key")
    same_key = str(tmp_path / "same-key")
    keyfsctl("init", same_key, "--kms", "local", "--keystore", keystore, "--key", "test")
    for b in (other, same_key):
        m = mount(backing=b)
        write_file(m.path("x"), b"from " + b.encode())
        m.umount()
    shutil.copy(os.path.join(other, "x"), os.path.join(volume, "from-other"))
    shutil.copy(os.path.join(same_key, "x"), os.path.join(volume, "same-key"))
    r = fsck(volume)
    assert r.returncode == EXIT_DAMAGED, r
    assert r.stdout.splitlines() == [
        "damaged: from-other: wrapped key does not unwrap with this volume's key (wrapped by key '%s')"
        % key_id(other),
        "damaged: same-key: wrapped key does not unwrap with this volume's key (damaged, or copied from another volume)",
        summary(2, 0, damaged=2),
    ]
    assert inspect_json(os.path.join(volume, "from-other"))[0]["key"] == key_id(other)


@pytest.mark.parametrize("action", ["suspend", "destroy"])
def test_key_suspended_or_destroyed_is_exit_8_no_damage(tree_volume, keystore, action):
    backing, _ = tree_volume
    keyfsctl("key", action, "test", "--keystore", keystore)
    r = fsck(backing)
    assert r.returncode == EXIT_LOCKED, r
    assert r.stdout == ""
    assert "damaged" not in r.stderr
    state = "suspended" if action == "suspend" else "destroyed"
    assert r.stderr == ("keyfsctl: error: key 'test' is %s: no file key of '%s' can be unwrapped, so fsck cannot run\n"
                        % (state, os.path.realpath(backing)))


def test_not_a_volume_and_usage(tmp_path, keystore):
    plain = tmp_path / "plain"
    plain.mkdir()
    r = fsck(str(plain))
    assert r.returncode == EXIT_CONFIG, r
    assert "is not a keyfs volume" in r.stderr and r.stdout == ""
    assert fsck(str(tmp_path / "missing")).returncode == EXIT_CONFIG
    assert run([KEYFSCTL, "fsck"]).returncode == EXIT_USAGE
    assert run([KEYFSCTL, "fsck", str(plain), str(plain)]).returncode == EXIT_USAGE
    assert run([KEYFSCTL, "fsck", "--bogus", str(plain)]).returncode == EXIT_USAGE
    # A keystore that does not exist: the key service is unusable.
    v = str(tmp_path / "v")
    keyfsctl("init", v, "--kms", "local", "--keystore", keystore, "--key", "k", "--create-key")
    r = fsck(v, "--keystore", str(tmp_path / "nokeystore"))
    assert r.returncode == EXIT_KMS, r


def test_unknown_format_version_is_not_checked(volume, mount):
    m = mount()
    write_file(m.path("f"), b"f" * 100)
    m.umount()
    with open(m.bpath("f"), "r+b") as f:
        f.seek(8)
        f.write(b"\x03\x00")
    r = fsck(volume)
    assert r.returncode == EXIT_IO, r
    assert r.stdout.splitlines() == [
        "could not check: f: its header (slot 0) names format version 3 and cipher %d, unknown to this "
        "keyfsctl (written by a newer keyfs, or damaged)" % CIPHER_ID,
        summary(0, 0, not_checked=1),
    ]


def test_special_files_hard_links_and_other_filesystems(volume, keystore, mount, tmp_path):
    m = mount()
    write_file(m.path("a"), b"a" * 5000)
    os.link(m.path("a"), m.path("b-link"))
    os.mkfifo(m.path("fifo"))
    os.mkdir(m.path("sub"))
    m.umount()
    # Another filesystem mounted inside the backing dir is not entered.
    inner = str(tmp_path / "inner")
    keyfsctl("init", inner, "--kms", "local", "--keystore", keystore, "--key", "inner", "--create-key")
    im = mount(backing=inner, mnt=m.bpath("sub"))
    write_file(im.path("secret"), b"plaintext behind a mount")
    r = fsck(volume)
    assert r.returncode == EXIT_IO, r
    # The hard link is checked once.
    assert r.stdout.splitlines() == [
        "note: fifo: a fifo: keyfs keeps no contents for it",
        "could not check: sub: another filesystem is mounted there",
        summary(1, 5000, not_checked=1),
    ]
    r, doc = fsck_json(volume)
    assert r.returncode == EXIT_IO
    assert doc["not_checked"] == [{"path": "sub", "error": "another filesystem is mounted there"}]
    assert doc["notes"] == [{"path": "fifo", "note": "a fifo: keyfs keeps no contents for it"}]
    assert doc["result"] == "incomplete"
    im.umount()


def test_file_changing_under_the_check_is_not_judged(volume, mount):
    m = mount()
    write_file(m.path("aaa"), b"a")
    write_file(m.path("busy"), os.urandom(32 << 20))
    m.umount()
    p = m.bpath("busy")
    same = read_file(p)[LAYOUT.data_offset(5):LAYOUT.data_offset(5) + CHUNK]
    stop = threading.Event()
    wrote = threading.Event()

    def writer():
        # Rewrites one chunk with its own bytes: the file stays valid, its times keep changing.
        fd = os.open(p, os.O_WRONLY)
        try:
            while not stop.is_set():
                os.pwrite(fd, same, LAYOUT.data_offset(5))
                wrote.set()
        finally:
            os.close(fd)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert wrote.wait(10)
        r, doc = fsck_json(volume)
    finally:
        stop.set()
        t.join()
    assert r.returncode == EXIT_OK, r
    assert doc["changed"] == ["busy"]
    assert doc["damaged"] == [] and doc["files_checked"] == 1 and doc["bytes_checked"] == 1
    assert doc["result"] == "clean"
    r = fsck(volume)
    assert r.stdout == summary(2, 1 + (32 << 20)) + "\n"


def test_alongside_a_live_mount_never_claims_damage(volume, mount):
    m = mount()
    size = 8 << 20
    write_file(m.path("db"), os.urandom(size))
    stop = threading.Event()
    errors = []

    def writer():
        i = 0
        try:
            fd = os.open(m.path("db"), os.O_WRONLY)
            try:
                while not stop.is_set():
                    os.pwrite(fd, secrets.token_bytes(3000), (i * 7919 * 13) % (size - 3000))
                    if i % 16 == 0:
                        os.fsync(fd)
                    i += 1
            finally:
                os.close(fd)
            write_file(m.path("new-%d" % i), b"n" * (i % 9000))
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3):
            r = fsck(volume)
            assert r.returncode == EXIT_OK, r
            assert "damaged:" not in r.stdout and ": 0 damaged, 0 not checked, " in r.stdout, r
    finally:
        stop.set()
        t.join()
    assert errors == []
    m.umount()
    r = fsck(volume)
    assert r.returncode == EXIT_OK, r


def test_progress_only_on_a_terminal(tree_volume):
    backing, total = tree_volume
    rc, out, tty = run_stderr_on_tty([KEYFSCTL, "fsck", backing])
    assert rc == EXIT_OK
    # The report stays on stdout, clean; the terminal got a progress line, erased at the end.
    assert out.decode() == summary(4, total) + "\n"
    assert b"fsck: " in tty and tty.endswith(b"\r\x1b[K"), tty


# ---- Key Protect: the key service failing in the middle of a run ----

@pytest.fixture
def kpvol(emu, tmp_path, kp_client_env, apikey_file, mount):
    apikey = apikey_file
    backing = str(tmp_path / "backing")
    r = init_keyprotect(emu, backing, apikey)
    assert r.returncode == EXIT_OK, r
    m = mount(backing=backing, opts=["apikey_file=" + apikey, "dek_pool=0"])
    for i in range(4):
        write_file(m.path("f%d" % i), b"%d" % i * 5000)
    m.umount()
    return backing, apikey


def test_keyprotect_clean(kpvol):
    backing, apikey = kpvol
    r = fsck(backing, "--apikey-file", apikey)
    assert (r.returncode, r.stdout, r.stderr) == (EXIT_OK, summary(4, 20000) + "\n", ""), r
    r = fsck(backing)
    assert r.returncode == EXIT_KMS and "--apikey-file" in r.stderr, r


@pytest.mark.parametrize("status,code", [(503, EXIT_KMS), (410, EXIT_LOCKED)])
def test_keyprotect_failing_mid_run_stops(emu, kpvol, status, code):
    backing, apikey = kpvol
    # The key's state is read first and answers; every unwrap then fails.
    emu.clear_log()
    emu.add_fault("status", status=status, count=-1, match="/actions/unwrap")
    r, doc = fsck_json(backing, "--apikey-file", apikey)
    assert r.returncode == code, r
    assert doc["files_checked"] == 0 and doc["damaged"] == []
    assert [e["path"] for e in doc["not_checked"]] == ["f0"]
    assert doc["stopped"] and "HTTP %d" % status in doc["stopped"]
    assert doc["result"] == "incomplete"
    assert "stopped at 'f0'" in r.stderr
    # One file's worth of tries (5 on a 5xx, one on a 410), not one per file.
    unwraps = emu.requests(kind="kms", path="/actions/unwrap")
    assert len(unwraps) == (5 if status == 503 else 1), unwraps


def test_keyprotect_damage_outranks_a_failing_service(emu, kpvol):
    backing, apikey = kpvol
    # Damage that needs no key (a cut header) comes first in name order.
    write_file(os.path.join(backing, "a-short"), b"x" * 100)
    emu.add_fault("status", status=503, count=-1, match="/actions/unwrap")
    r = fsck(backing, "--apikey-file", apikey)
    assert r.returncode == EXIT_DAMAGED, r
    assert r.stdout.splitlines()[0] == \
        "damaged: a-short: backing size 100 is shorter than the keyfs header area (%d bytes)" % HEADER_AREA
    assert r.stdout.splitlines()[1].startswith("could not check: f0: ")
    assert r.stdout.splitlines()[2] == summary(1, 0, damaged=1, not_checked=1)
