# test_suite_defined.py: the test command runs the whole suite, whatever configured the build dir
#
# README's order on a fresh machine is `./quickstart.sh demo` (configures build/ before the test
# packages are installed) then `./quickstart.sh test`. A build dir configured without pytest
# must still define the test 'pytest', failing with what to do, and a reconfigure once pytest is
# there must define the real suite. Checked by configuring a fresh build dir (no compile) with
# -Dpytest= pointing at a path that does not exist yet, then "installing" it there.
import json
import os
import shutil

import pytest

from helpers import SRC_DIR, run

MISSING_MSG = ("pytest not found when this build dir was configured: install python3-pytest, then run meson "
               "setup --reconfigure")


def _tool(name):
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("%s is missing: it configures the build dir under test" % name, pytrace=False)
        pytest.skip("%s is missing" % name)
    return path


def _tests(meson, build):
    r = run([meson, "introspect", "--tests", build], timeout=60)
    assert r.returncode == 0, r.stderr
    return {t["name"]: t for t in json.loads(r.stdout)}


def test_suite_is_defined_before_and_after_pytest_is_installed(tmp_path):
    meson = _tool("meson")
    real = shutil.which("pytest-3") or "/usr/bin/pytest"
    assert os.access(real, os.X_OK), "no pytest to 'install'"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    pytest_path = str(bindir / "pytest")         # not there yet: pytest is "not installed"
    build = str(tmp_path / "build")

    r = run([meson, "setup", build, SRC_DIR, "-Dpytest=" + pytest_path], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([meson, "test", "-C", build, "--no-rebuild", "--list"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pytest" in r.stdout.split(), r.stdout
    tests = _tests(meson, build)
    assert tests["pytest"]["suite"] == ["keyfs:integration"], tests["pytest"]
    # Running it fails and says what to do (no build needed: it depends on nothing).
    r = run([meson, "test", "-C", build, "--no-rebuild", "--print-errorlogs", "pytest"], timeout=120)
    assert r.returncode != 0, r.stdout
    with open(os.path.join(build, "meson-logs", "testlog.txt"), errors="replace") as f:
        assert MISSING_MSG in f.read()

    # "Install" pytest where the build dir looks for it; a reconfigure defines the real suite.
    os.symlink(real, pytest_path)
    r = run([meson, "setup", "--reconfigure", build, SRC_DIR], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    t = _tests(meson, build)["pytest"]
    assert t["cmd"][0] == pytest_path, t
    assert t["cmd"][-1] == os.path.join(SRC_DIR, "tests"), t
    assert t["suite"] == ["keyfs:integration"], t
    assert "KEYFS_BUILD_DIR" in t["env"] and t["env"]["KEYFS_BUILD_DIR"] == build, t
    # The same suite again on format v1 volumes (tests/layout.py).
    assert t["env"].get("KEYFS_TEST_FORMAT") == "2", t
    t1 = _tests(meson, build)["pytest-v1"]
    assert t1["cmd"] == t["cmd"] and t1["env"].get("KEYFS_TEST_FORMAT") == "1", t1
