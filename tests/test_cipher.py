# test_cipher.py: the chunk AEAD of a volume's files (docs/FORMAT.md, cipher choice): what init
# picks and records, that every file's own header names its cipher (so a volume may hold both),
# and that a cipher cannot be swapped or asked of a format that lacks it.
# These make their own v2 volumes, so they run in both suite runs.
import errno
import os

import pytest

from helpers import KEYFS, KEYFSCTL, cpu_has_aes, inspect_json, read_file, run, write_file

XAES, XCHACHA = "xaes-256-gcm", "xchacha20-poly1305"


def init(tmp_path, keystore, name, *args):
    backing = str(tmp_path / name)
    r = run([KEYFSCTL, "init", backing, "--kms", "local", "--keystore", keystore, "--key", "c"]
            + ([] if os.path.exists(keystore) else ["--create-key"]) + list(args))
    return backing, r


def desc(backing):
    with open(os.path.join(backing, ".keyfs")) as f:
        return f.read()


def set_desc_cipher(backing, cipher):
    lines = [ln for ln in desc(backing).splitlines() if not ln.startswith("cipher=")]
    if cipher:
        lines.append("cipher=" + cipher)
    with open(os.path.join(backing, ".keyfs"), "w") as f:
        f.write("\n".join(lines) + "\n")


def test_init_picks_xaes_where_the_cpu_has_aes_and_records_it(tmp_path, keystore):
    backing, r = init(tmp_path, keystore, "v", "--format", "2")
    assert r.returncode == 0, r
    want = XAES if cpu_has_aes() else XCHACHA
    assert "  cipher:   %s\n" % want in r.stdout
    assert "cipher=%s\n" % want in desc(backing)
    out = run([KEYFSCTL, "inspect", "-r", backing]).stdout
    assert "format: 2\ncipher: %s\n" % want in out


@pytest.mark.parametrize("cipher", [XAES, XCHACHA])
def test_each_cipher_reads_back_what_was_written_and_says_so(tmp_path, keystore, mount, cipher):
    backing, r = init(tmp_path, keystore, "v", "--format", "2", "--cipher", cipher)
    assert r.returncode == 0, r
    m = mount(backing=backing)
    assert "format 2, %s," % cipher in m.stderr()
    data = os.urandom(3 * 4096 + 123)
    write_file(m.path("f"), data)
    fd = os.open(m.path("f"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 10, 4090)          # straddles chunks 0 and 1: both re-sealed
    finally:
        os.close(fd)
    data = data[:4090] + b"x" * 10 + data[4100:]
    m.remount()
    assert read_file(m.path("f")) == data
    [doc] = inspect_json(m.bpath("f"))
    assert doc["cipher"] == cipher
    raw = read_file(m.bpath("f"))
    assert raw[10] == {XCHACHA: 1, XAES: 2}[cipher]
    assert data[:64] not in raw


def test_a_volume_holds_files_of_both_ciphers(tmp_path, keystore, mount):
    """The description's cipher is for new files; each file's header names its own. An admin who
    changes the line keeps every older file readable."""
    backing, r = init(tmp_path, keystore, "v", "--format", "2", "--cipher", XCHACHA)
    assert r.returncode == 0, r
    m = mount(backing=backing)
    old = os.urandom(20000)
    write_file(m.path("old"), old)
    m.umount()
    set_desc_cipher(backing, XAES)
    m = mount(backing=backing)
    new = os.urandom(20000)
    write_file(m.path("new"), new)
    # Rewriting an old file keeps its cipher: its header is not replaced.
    with open(m.path("old"), "r+b") as f:
        f.write(b"rewritten")
    old = b"rewritten" + old[9:]
    assert read_file(m.path("old")) == old and read_file(m.path("new")) == new
    docs = inspect_json(m.bpath("old"), m.bpath("new"))
    assert [d["cipher"] for d in docs] == [XCHACHA, XAES]


def test_a_cipher_swapped_in_a_header_does_not_authenticate(tmp_path, keystore, mount):
    """The header MAC covers the cipher byte: naming the other cipher makes the file unreadable
    (EIO), never read under the wrong AEAD."""
    backing, r = init(tmp_path, keystore, "v", "--format", "2", "--cipher", XAES)
    assert r.returncode == 0, r
    m = mount(backing=backing, allow_errors=True)
    write_file(m.path("f"), b"secret contents" * 100)
    write_file(m.path("g"), b"other" * 100)
    m.umount()
    with open(os.path.join(backing, "f"), "r+b") as f:
        f.seek(10)
        f.write(b"\x01")
    m = mount(backing=backing, allow_errors=True)
    with pytest.raises(OSError) as e:
        read_file(m.path("f"))
    assert e.value.errno == errno.EIO
    assert read_file(m.path("g")) == b"other" * 100


def test_xaes_needs_format_2_and_a_known_name(tmp_path, keystore):
    backing, r = init(tmp_path, keystore, "v1", "--format", "1", "--cipher", XAES)
    assert r.returncode == 2
    assert "--cipher xaes-256-gcm needs --format 2" in r.stderr
    assert not os.path.exists(os.path.join(backing, ".keyfs"))
    backing, r = init(tmp_path, keystore, "bogus", "--cipher", "aes-256-gcm")
    assert r.returncode == 2
    assert "--cipher 'aes-256-gcm': use xaes-256-gcm or xchacha20-poly1305" in r.stderr
    # A v1 volume with --cipher xchacha20-poly1305 is what v1 is: no cipher line.
    backing, r = init(tmp_path, keystore, "v1ok", "--format", "1", "--cipher", XCHACHA)
    assert r.returncode == 0, r
    assert "cipher=" not in desc(backing)


@pytest.mark.parametrize("fmt,cipher,why", [
    ("2", "aes-128-cbc", "unknown cipher 'aes-128-cbc'"),
    ("1", XAES, "cipher 'xaes-256-gcm' needs format=2"),
])
def test_a_description_naming_a_bad_cipher_is_refused(tmp_path, keystore, mount, fmt, cipher, why):
    backing, r = init(tmp_path, keystore, "v", "--format", fmt, "--cipher", XCHACHA)
    assert r.returncode == 0, r
    set_desc_cipher(backing, cipher)
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    r = run([KEYFS, backing, mnt, "-f"], timeout=30)
    assert r.returncode == 3, r
    assert why in r.stderr
    assert not os.path.ismount(mnt)
