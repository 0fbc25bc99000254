# test_inspect.py: keyfsctl inspect -r: a whole tree from the backing dir or a mount, its summary and exit codes
import json
import os
import struct
import subprocess

from helpers import (CIPHER, EXIT_CONFIG, EXIT_IO, EXIT_OK, FORMAT, HEADER_AREA, HEADER_SIZE, KEYFSCTL, backing_size,
                     inspect_json, key_show, keyfsctl, need_root, run, run_stderr_on_tty, write_file)

NO_HEADER = "is not a keyfs file: it has no valid keyfs header"

# name -> plaintext bytes of the keyfs files the standard tree creates through the mount
TREE_FILES = {"top": 1, "a/f1": 5000, "a/empty": 0, "a/b/f2": 4096, "a/b/c/deep": 10000, "a/.keyfs": 7}


def inspect_r(*args, rc=EXIT_OK):
    """keyfsctl inspect -r --json ARGS: (parsed object, stderr), checking the exit code."""
    r = run([KEYFSCTL, "inspect", "-r", "--json", *args])
    assert r.returncode == rc, "exit %d, want %d\nstdout:\n%s\nstderr:\n%s" % (r.returncode, rc, r.stdout, r.stderr)
    return json.loads(r.stdout), r.stderr


def make_tree(mnt):
    """Nested dirs, files of exact sizes, an empty file, a symlink and a fifo through the mount; then,
    in the backing dir, a file with no header yet (size 0) and a file that is not a keyfs file."""
    os.makedirs(mnt.path("a", "b", "c"))
    os.makedirs(mnt.path("d"))
    for name, size in TREE_FILES.items():
        write_file(mnt.path(name), os.urandom(size))
    os.symlink("a/f1", mnt.path("link"))
    os.mkfifo(mnt.path("d", "fifo"))
    write_file(mnt.bpath("a", "zero"), b"")
    write_file(mnt.bpath("d", "odd.bin"), b"not keyfs " * 300)


def craft(path, key, version, plain=0):
    """Write a backing file whose header parses (docs/FORMAT.md) naming key and version; no key made it."""
    slot = bytearray(HEADER_SIZE)
    k, v, w = key.encode(), version.encode(), os.urandom(77)
    slot[0:8] = b"KEYFSHDR"
    struct.pack_into("<HBBI", slot, 8, 1, 1, 12, HEADER_SIZE)
    slot[16:32] = b"\x01" + os.urandom(15)
    struct.pack_into("<BBHI", slot, 32, len(k), len(v), len(w), 1)
    slot[40:40 + len(k) + len(v) + len(w)] = k + v + w
    slot[992:] = os.urandom(32)
    size = backing_size(plain)
    write_file(path, bytes(slot) + bytes(HEADER_AREA - HEADER_SIZE) + os.urandom(size - HEADER_AREA))


def rel_files(doc, prefix):
    """{relative path: file object} of an inspect -r --json object, prefix stripped from the paths."""
    out = {}
    for f in doc["files"]:
        assert f["path"].startswith(prefix + "/"), f["path"]
        out[f["path"][len(prefix) + 1:]] = f
    return out


def test_tree_from_backing_and_mount(mnt, keystore):
    make_tree(mnt)
    _, key = key_show(keystore, "test")
    plain = sum(TREE_FILES.values())
    backing = sum(backing_size(n) for n in TREE_FILES.values())
    want_summary = {
        "files": len(TREE_FILES) + 1, "empty_files": 2, "plaintext_bytes": plain, "backing_bytes": backing,
        "directories": 4, "symlinks": 1, "other": 1, "unreadable": 1, "not_visited": 0,
        "keys": [{"key": key["id"], "versions": [{"version": "1", "files": len(TREE_FILES)}]}],
        "other_key_files": 0, "unreadable_not_listed": 0, "not_visited_not_listed": 0,
    }

    docs = {}
    for top in (mnt.backing, mnt.mnt):
        doc, err = inspect_r(top, rc=EXIT_CONFIG)
        assert doc["paths"] == [top]
        assert doc["summary"] == want_summary, top
        assert doc["unreadable"] == [{"path": top + "/d/odd.bin", "error": NO_HEADER}]
        assert doc["not_visited"] == []
        files = rel_files(doc, top)
        # Name order, depth first; the volume description never shows, a nested .keyfs is a file.
        assert list(files) == ["a/.keyfs", "a/b/c/deep", "a/b/f2", "a/empty", "a/f1", "a/zero", "top"]
        for name, size in TREE_FILES.items():
            f = files[name]
            assert f["plaintext_size"] == size and f["backing_size"] == backing_size(size), name
            assert f["key"] == key["id"] and f["key_version"] == "1", name
            assert f["backing"] == mnt.bpath(name)
        zero = files["a/zero"]
        assert (zero["format"], zero["key"], zero["plaintext_size"], zero["backing_size"]) == (None, None, 0, 0)
        assert "1 file without a readable keyfs header" in err
        docs[top] = files

    # Same files either way; only the mount field tells them apart.
    via_backing, via_mount = docs[mnt.backing], docs[mnt.mnt]
    for name, f in via_backing.items():
        g = via_mount[name]
        assert f["mount"] is None
        assert g["mount"] == {"mountpoint": mnt.mnt, "state": "unlocked", "reason": None}
        assert {k: v for k, v in f.items() if k not in ("path", "mount")} == \
               {k: v for k, v in g.items() if k not in ("path", "mount")}, name

    # Each object is exactly what plain inspect prints for that path.
    plain_docs = inspect_json(*[mnt.path(n) for n in sorted(TREE_FILES)])
    for name, p in zip(sorted(TREE_FILES), plain_docs):
        assert via_mount[name] == p, name


def volume_uuid(backing):
    for line in open(os.path.join(backing, ".keyfs")).read().splitlines():
        if line.startswith("volume="):
            return line[len("volume="):]
    raise AssertionError("no volume= in .keyfs")


def test_tree_text_summary(mnt, keystore):
    make_tree(mnt)
    _, key = key_show(keystore, "test")
    plain = sum(TREE_FILES.values())
    backing = sum(backing_size(n) for n in TREE_FILES.values())
    r = run([KEYFSCTL, "inspect", "-r", mnt.mnt])
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert r.stdout == (
        "backing: %s\n"
        "mount: %s (unlocked)\n"
        "volume: %s\n"
        "format: %d\n"
        "cipher: %s\n"
        "key name: test\n"
        "key uuid: %s\n"
        "files: 7 (2 empty)\n"
        "plaintext bytes: %d (18.7 KiB)\n"
        "backing bytes: %d\n"
        "directories: 4\n"
        "symlinks: 1\n"
        "other: 1 (sockets, fifos, devices)\n"
        "keys in use:\n"
        "  %s version 1: 6 files\n"
        "unreadable headers: 1\n"
        "  %s/d/odd.bin %s\n"
        "not visited: 0\n" % (mnt.backing, mnt.mnt, volume_uuid(mnt.backing), FORMAT, CIPHER, key["id"], plain, backing, key["id"],
                               mnt.mnt, NO_HEADER))
    assert ".keyfs" not in r.stdout.replace("a/.keyfs", "")


def test_subdir_and_relative_paths(mnt):
    make_tree(mnt)
    r = run([KEYFSCTL, "inspect", "-r", "--json", "mnt/a/b/", "backing/a/b/c"], cwd=os.path.dirname(mnt.mnt))
    assert r.returncode == EXIT_OK, r.stderr
    assert r.stderr == ""
    doc = json.loads(r.stdout)
    assert [f["path"] for f in doc["files"]] == ["mnt/a/b/c/deep", "mnt/a/b/f2", "backing/a/b/c/deep"]
    assert [f["backing"] for f in doc["files"]] == [mnt.bpath("a/b/c/deep"), mnt.bpath("a/b/f2"),
                                                    mnt.bpath("a/b/c/deep")]
    s = doc["summary"]
    assert (s["files"], s["directories"], s["plaintext_bytes"]) == (3, 1, 10000 + 4096 + 10000)
    assert s["keys"][0]["versions"] == [{"version": "1", "files": 3}]


def test_single_file_like_plain_inspect(mnt):
    write_file(mnt.path("f"), b"z" * 12345)
    plain = inspect_json(mnt.path("f"))[0]
    doc, err = inspect_r(mnt.path("f"))
    assert err == ""
    assert doc["files"] == [plain]
    s = doc["summary"]
    assert (s["files"], s["plaintext_bytes"], s["backing_bytes"], s["directories"]) == \
           (1, 12345, backing_size(12345), 0)
    # Not a keyfs file: the same exit code as plain inspect.
    write_file(mnt.bpath("plain.txt"), b"hello")
    doc, _ = inspect_r(mnt.bpath("plain.txt"), rc=EXIT_CONFIG)
    assert doc["files"] == []
    assert doc["unreadable"] == [{"path": mnt.bpath("plain.txt"),
                                  "error": "is not a keyfs file: it is shorter than a keyfs header"}]


def test_without_r_unchanged(mnt):
    write_file(mnt.path("f"), b"abc")
    r = run([KEYFSCTL, "inspect", "--json", mnt.path()])
    assert r.returncode == EXIT_CONFIG
    assert "is not a keyfs file: it is a directory" in r.stderr
    assert json.loads(r.stdout) == []
    r = run([KEYFSCTL, "inspect", "--json", mnt.path("f")])
    assert r.returncode == EXIT_OK
    assert isinstance(json.loads(r.stdout), list)


def test_key_versions_after_rotation(mount, volume, keystore):
    m = mount()
    for i in range(3):
        write_file(m.path("old%d" % i), b"o" * i)
    m.umount()
    keyfsctl("key", "rotate", "test", "--keystore", keystore)
    m.start()
    for i in range(2):
        write_file(m.path("new%d" % i), b"n" * 100)
    _, key = key_show(keystore, "test")
    doc, _ = inspect_r(m.mnt)
    assert doc["summary"]["keys"] == [{"key": key["id"], "versions": [{"version": "1", "files": 3},
                                                                      {"version": "2", "files": 2}]}]
    r = keyfsctl("inspect", "-r", m.backing)
    assert "keys in use:\n  %s version 1: 3 files\n  %s version 2: 2 files\n" % (key["id"], key["id"]) in r.stdout


def test_key_table_sorted_and_capped(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    for key, version in [("kb", "10"), ("kb", "9"), ("ka", "x"), ("kb", "2"), ("kb", "9"), ("ka", "")]:
        craft(str(d / ("%s-%s-%d" % (key, version, len(os.listdir(d))))), key, version, plain=10)
    doc, _ = inspect_r(str(d))
    assert doc["summary"]["keys"] == [
        {"key": "ka", "versions": [{"version": "", "files": 1}, {"version": "x", "files": 1}]},
        {"key": "kb", "versions": [{"version": "2", "files": 1}, {"version": "9", "files": 2},
                                   {"version": "10", "files": 1}]}]
    r = keyfsctl("inspect", "-r", str(d))
    assert "  ka version (none): 1 file\n  ka version x: 1 file\n  kb version 2: 1 file\n" in r.stdout

    # More distinct versions than the table holds: the rest are counted, not listed.
    c = tmp_path / "cap"
    c.mkdir()
    for i in range(1030):
        craft(str(c / ("f%04d" % i)), "k", "%04d" % i)
    doc, _ = inspect_r(str(c))
    s = doc["summary"]
    assert s["files"] == 1030
    assert len(s["keys"][0]["versions"]) == 1024
    assert s["other_key_files"] == 6
    assert sum(v["files"] for v in s["keys"][0]["versions"]) == 1024


def test_unreadable_list_capped(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    for i in range(10003):
        (d / ("%05d" % i)).write_bytes(b"j")
    doc, _ = inspect_r(str(d), rc=EXIT_CONFIG)
    assert doc["summary"]["unreadable"] == 10003
    assert len(doc["unreadable"]) == 10000
    assert doc["summary"]["unreadable_not_listed"] == 3
    r = run([KEYFSCTL, "inspect", "-r", str(d)])
    assert "unreadable headers: 10003\n" in r.stdout and "  ... and 3 more\n" in r.stdout


def test_missing_path_and_symlink_path(mnt, tmp_path):
    write_file(mnt.path("f"), b"abc")
    missing = str(tmp_path / "missing")
    lnk = str(tmp_path / "lnk")
    os.symlink(mnt.mnt, lnk)
    doc, err = inspect_r(missing, lnk, mnt.path("f"), rc=EXIT_CONFIG)
    assert doc["not_visited"] == [{"path": missing, "error": "does not exist"},
                                  {"path": lnk, "error": "is a symbolic link: not followed"}]
    assert [f["path"] for f in doc["files"]] == [mnt.path("f")]
    assert "2 paths not visited" in err


def test_never_reads_through_the_mount(mnt):
    write_file(mnt.path("f"), b"secret")
    # A symlink in the backing tree that leads into the mount is counted, never followed.
    os.symlink(mnt.mnt, mnt.bpath("into-mount"))
    doc, err = inspect_r(mnt.backing)
    assert err == ""
    assert doc["summary"]["files"] == 1 and doc["summary"]["symlinks"] == 1
    assert [f["backing"] for f in doc["files"]] == [mnt.bpath("f")]


def test_other_filesystem_not_entered(mnt):
    need_root()
    write_file(mnt.path("f"), b"abc")
    os.mkdir(mnt.bpath("tm"))
    subprocess.run(["mount", "-t", "tmpfs", "none", mnt.bpath("tm")], check=True)
    try:
        write_file(mnt.bpath("tm", "inner"), b"x" * 5000)
        write_file(mnt.bpath("odd"), b"y" * 5000)
        # Not visited is an I/O exit (6), and outranks the unreadable header (3).
        doc, err = inspect_r(mnt.mnt, rc=EXIT_IO)
        assert doc["not_visited"] == [{"path": mnt.mnt + "/tm",
                                       "error": "another filesystem is mounted there: not entered"}]
        assert doc["unreadable"] == [{"path": mnt.mnt + "/odd", "error": NO_HEADER}]
        assert doc["summary"]["files"] == 1
    finally:
        subprocess.run(["umount", mnt.bpath("tm")], check=True)


def test_control_bytes_in_names(mnt):
    write_file(mnt.path("ok"), b"1")
    write_file(mnt.bpath("bad\x1b[31mname"), b"junk")
    r = run([KEYFSCTL, "inspect", "-r", mnt.backing])
    assert r.returncode == EXIT_CONFIG
    assert "\x1b" not in r.stdout and "\x1b" not in r.stderr
    assert "bad\\033[31mname is not a keyfs file" in r.stdout
    doc, _ = inspect_r(mnt.backing, rc=EXIT_CONFIG)
    assert doc["unreadable"][0]["path"] == mnt.bpath("bad\x1b[31mname")


def test_json_stays_valid_utf8_for_any_file_name(mnt):
    # A name in UTF-8 passes through as it is; bytes that are not UTF-8 (a Latin-1 name from an
    # old system) become U+FFFD, so the output is still JSON a strict parser accepts.
    write_file(mnt.path("na\u00efve-\u65e5\u672c"), b"utf8")
    with open(os.path.join(os.fsencode(mnt.backing), b"caf\xe9-\xff\xc0\xaf"), "wb") as f:
        f.write(b"not keyfs " * 300)
    r = subprocess.run([KEYFSCTL, "inspect", "-r", "--json", mnt.backing], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    assert r.returncode == EXIT_CONFIG
    doc = json.loads(r.stdout.decode("utf-8", errors="strict"))
    assert [f["path"] for f in doc["files"]] == [mnt.backing + "/na\u00efve-\u65e5\u672c"]
    assert [u["path"] for u in doc["unreadable"]] == [mnt.backing + "/caf\ufffd-\ufffd\ufffd\ufffd"]


def test_progress_only_on_a_terminal(mnt):
    make_tree(mnt)
    os.unlink(mnt.bpath("d", "odd.bin"))
    r = run([KEYFSCTL, "inspect", "-r", mnt.mnt])
    assert r.returncode == EXIT_OK
    assert r.stderr == ""
    # stderr a terminal: one self-erasing progress line, the summary on stdout untouched.
    rc, stdout, out = run_stderr_on_tty([KEYFSCTL, "inspect", "-r", mnt.mnt])
    assert rc == EXIT_OK
    assert b"inspect: " in out and out.endswith(b"\r\x1b[K"), out
    assert stdout.startswith(b"backing: ")


def test_mount_state_comes_from_the_daemon(mnt):
    write_file(mnt.path("f"), b"data")
    r = run([KEYFSCTL, "lock", mnt.mnt])
    assert r.returncode == EXIT_OK, r
    doc = json.loads(run([KEYFSCTL, "inspect", "--json", mnt.path("f")]).stdout)
    assert doc[0]["mount"] == {"mountpoint": mnt.mnt, "state": "locked", "reason": "manual"}
    r = run([KEYFSCTL, "inspect", mnt.path("f")])
    assert "mount: %s (locked: manual)\n" % mnt.mnt in r.stdout
    assert run([KEYFSCTL, "unlock", mnt.mnt]).returncode == EXIT_OK
    doc = json.loads(run([KEYFSCTL, "inspect", "--json", mnt.path("f")]).stdout)
    assert doc[0]["mount"] == {"mountpoint": mnt.mnt, "state": "unlocked", "reason": None}
    # The backing side of the same file knows no mount.
    doc = json.loads(run([KEYFSCTL, "inspect", "--json", mnt.bpath("f")]).stdout)
    assert doc[0]["mount"] is None
