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


def test_v1_manifest_matches_its_generator():
    """The manifest is the generator's deterministic contents, not a record of some run."""
    with open(os.path.join(FIXTURES, "v1", "manifest.json")) as f:
        manifest = json.load(f)["files"]
    want = {}
    for name, data in generator().contents().items():
        if isinstance(data, tuple):
            want[name] = {"symlink": data[1]}
        else:
            want[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest == want


def test_v1_reads_back_exactly(tmp_path, mount):
    vol = str(tmp_path / "v1")
    manifest = copy_fixture("v1", vol)
    # A volume from elsewhere: trusted once, as its user would; the host names its keystore copy.
    keyfsctl("trust", "--yes", os.path.join(vol, "backing"))
    m = mount(backing=os.path.join(vol, "backing"), opts=("keystore=" + os.path.join(vol, "keystore"),))
    for name, want in manifest["files"].items():
        path = m.path(name)
        if "symlink" in want:
            assert os.readlink(path) == want["symlink"]
            continue
        with open(path, "rb") as f:
            data = f.read()
        assert os.stat(path).st_size == want["size"], name
        assert len(data) == want["size"], name
        assert hashlib.sha256(data).hexdigest() == want["sha256"], name
    # The names are exactly the fixture's, the volume description stays hidden.
    assert sorted(os.listdir(m.path())) == sorted({n.split("/")[0] for n in manifest["files"]})


def test_v1_headers_without_key(tmp_path):
    vol = str(tmp_path / "v1")
    manifest = copy_fixture("v1", vol)
    with open(os.path.join(vol, "backing", ".keyfs")) as f:
        desc = dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)
    shutil.rmtree(os.path.join(vol, "keystore"))          # no key at all: inspect needs none
    names = [n for n, w in manifest["files"].items() if "size" in w]
    docs = inspect_json(*[os.path.join(vol, "backing", n) for n in names])
    for name, doc in zip(names, docs):
        assert doc["format"] == 1, name
        assert doc["cipher"] == "xchacha20-poly1305"
        assert doc["chunk_size"] == 4096
        assert doc["key"] == desc["key_id"]
        assert doc["key_version"] == "1"
        assert doc["plaintext_size"] == manifest["files"][name]["size"], name
        assert len(doc["file_id"]) == 32 and len(doc["wrapped_dek_sha256"]) == 64


def test_v1_with_another_key_is_locked(tmp_path, mount):
    """The fixture with another key of the same name: the volume is bound to its key's id, so its
    key is gone: the mount comes up locked, names and sizes visible, contents EKEYREVOKED."""
    vol = str(tmp_path / "v1")
    manifest = copy_fixture("v1", vol)
    other = str(tmp_path / "other-keystore")
    keyfsctl("key", "create", "fixture", "--keystore", other)
    m = mount(backing=os.path.join(vol, "backing"), opts=("keystore=" + other,), allow_errors=True)
    assert "mounting locked" in m.stderr()
    assert os.stat(m.path("one")).st_size == manifest["files"]["one"]["size"]
    with pytest.raises(OSError) as e:
        open(m.path("one"), "rb")
    assert e.value.errno == errno.EKEYREVOKED
