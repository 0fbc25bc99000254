"""Format fixtures: every keyfs must still read the volumes earlier versions wrote (docs/FORMAT.md)."""
import errno
import hashlib
import importlib.util
import json
import os
import shutil

import pytest

from helpers import inspect_json, keyfsctl

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")


def generator():
    spec = importlib.util.spec_from_file_location("make_fixture", os.path.join(FIXTURES, "make-fixture.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def copy_fixture(name, dest):
    """A private copy: git does not keep the keystore's 0700/0600 modes, which keyfs insists on."""
    src = os.path.join(FIXTURES, name)
    shutil.copytree(src, dest, symlinks=True)
    os.chmod(os.path.join(dest, "keystore"), 0o700)
    for f in os.listdir(os.path.join(dest, "keystore")):
        os.chmod(os.path.join(dest, "keystore", f), 0o600)
    with open(os.path.join(dest, "manifest.json")) as f:
        return json.load(f)


# fixture dir -> (format, cipher of its files). v2/ predates the cipher line of the volume
# description: a volume without one is XChaCha20-Poly1305.
FIXTURE_KINDS = {"v1": (1, "xchacha20-poly1305"), "v2": (2, "xchacha20-poly1305"), "v2-xaes": (2, "xaes-256-gcm")}
NAMES = list(FIXTURE_KINDS)


@pytest.mark.parametrize("name", NAMES)
def test_manifest_matches_its_generator(name):
    """The manifest is the generator's deterministic contents, not a record of some run."""
    version, cipher = FIXTURE_KINDS[name]
    with open(os.path.join(FIXTURES, name, "manifest.json")) as f:
        doc = json.load(f)
    assert doc["format"] == version
    assert doc.get("cipher", "xchacha20-poly1305") == cipher
    manifest = doc["files"]
    want = {}
    for name, data in generator().contents(version).items():
        if isinstance(data, tuple):
            want[name] = {data[0]: data[1]}
        else:
            want[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest == want


@pytest.mark.parametrize("name", NAMES)
def test_reads_back_exactly(tmp_path, mount, name):
    version, cipher = FIXTURE_KINDS[name]
    vol = str(tmp_path / name)
    manifest = copy_fixture(name, vol)
    with open(os.path.join(vol, "backing", ".keyfs")) as f:
        desc = f.read()
    assert "format=%d\n" % version in desc
    assert ("cipher=" in desc) == (name == "v2-xaes")
    # A volume from elsewhere: trusted once, as its user would; the host names its keystore copy.
    keyfsctl("trust", "--yes", os.path.join(vol, "backing"))
    m = mount(backing=os.path.join(vol, "backing"), opts=("keystore=" + os.path.join(vol, "keystore"),))
    for name, want in manifest["files"].items():
        path = m.path(name)
        if "symlink" in want:
            assert os.readlink(path) == want["symlink"]
            continue
        if "hardlink" in want:
            # git keeps a hard link as two files with the same bytes (one header, one file id).
            want = manifest["files"][want["hardlink"]]
        with open(path, "rb") as f:
            data = f.read()
        assert os.stat(path).st_size == want["size"], name
        assert len(data) == want["size"], name
        assert hashlib.sha256(data).hexdigest() == want["sha256"], name
    # The names are exactly the fixture's, the volume description stays hidden.
    assert sorted(os.listdir(m.path())) == sorted({n.split("/")[0] for n in manifest["files"]})


@pytest.mark.parametrize("name", NAMES)
def test_headers_without_key(tmp_path, name):
    version, cipher = FIXTURE_KINDS[name]
    vol = str(tmp_path / name)
    manifest = copy_fixture(name, vol)
    with open(os.path.join(vol, "backing", ".keyfs")) as f:
        desc = dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)
    shutil.rmtree(os.path.join(vol, "keystore"))          # no key at all: inspect needs none
    names = [n for n, w in manifest["files"].items() if "size" in w]
    docs = inspect_json(*[os.path.join(vol, "backing", n) for n in names])
    for name, doc in zip(names, docs):
        assert doc["format"] == version, name
        assert doc["cipher"] == cipher
        assert doc["chunk_size"] == 4096
        assert doc["key"] == desc["key_id"]
        assert doc["key_version"] == "1"
        assert doc["plaintext_size"] == manifest["files"][name]["size"], name
        assert len(doc["file_id"]) == 32 and len(doc["wrapped_dek_sha256"]) == 64


@pytest.mark.parametrize("name", NAMES)
def test_with_another_key_is_locked(tmp_path, mount, name):
    """The fixture with another key of the same name: the volume is bound to its key's id, so its
    key is gone: the mount comes up locked, names and sizes visible, contents EKEYREVOKED."""
    vol = str(tmp_path / name)
    manifest = copy_fixture(name, vol)
    other = str(tmp_path / "other-keystore")
    keyfsctl("key", "create", "fixture", "--keystore", other)
    m = mount(backing=os.path.join(vol, "backing"), opts=("keystore=" + other,), allow_errors=True)
    assert "mounting locked" in m.stderr()
    assert os.stat(m.path("one")).st_size == manifest["files"]["one"]["size"]
    with pytest.raises(OSError) as e:
        open(m.path("one"), "rb")
    assert e.value.errno == errno.EKEYREVOKED


@pytest.mark.parametrize("name", ["v2", "v2-xaes"])
def test_v2_bytes_where_format_md_says(name):
    """The v2 fixtures' bytes: header page naming the cipher, tag entries holding holes as zeros,
    data pages."""
    from layout import LAYOUTS
    v2 = LAYOUTS[2]
    backing = os.path.join(FIXTURES, name, "backing")
    cipher_id = {"xchacha20-poly1305": 1, "xaes-256-gcm": 2}[FIXTURE_KINDS[name][1]]

    def raw(name):
        with open(os.path.join(backing, name), "rb") as f:
            return f.read()

    for name in ("one", "two-groups", "punched"):
        r = raw(name)
        assert r[:8] == b"KEYFSHDR" and r[8:10] == b"\x02\x00" and r[10] == cipher_id, name
        assert r[1024:4096] == bytes(3072), name          # slot 1 unused, then zeros to the page end
    two = raw("two-groups")
    assert len(two) == v2.backing_size(600 << 10) == 626688
    entries = [two[v2.entry_offset(i):v2.entry_offset(i) + 32] for i in range(150)]
    assert [i for i, e in enumerate(entries) if e != bytes(32)] == [126, 127, 128, 129, 149]
    punched = raw("punched")
    assert [i for i in range(5) if punched[v2.entry_offset(i):v2.entry_offset(i) + 32] == bytes(32)] == [2]
    assert punched[v2.page_offset(2):v2.page_offset(3)] == bytes(4096)   # the data page punched too
