# conftest.py: the pytest harness that mounts real keyfs filesystems and always cleans them up
#
# Modelled on libfuse's test/util.py: wait for the mount by polling os.path.ismount with a
# deadline, unmount in a finalizer, wait for and (only if it hangs) kill the daemon we started,
# by pid, and fail a test whose daemon printed words that mean a crash or an unexpected error.
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from helpers import (APIKEY, BUILD_DIR, EMU_APIKEYS, FUSERMOUNT, KEYFS, KEYFSCTL, MOUNT_TIMEOUT,
                     binaries_missing, is_mounted, keyfsctl, secret_file)

# Words in a daemon's stderr that fail the test. "error:" is the prefix of every log_err line;
# tests that provoke errors on purpose (tampering, missing keys) pass allow_errors=True.
CRASH_PATTERNS = [
    r"segmentation fault", r"segfault", r"sanitizer", r"double free", r"free\(\): ",
    r"malloc\(\): ", r"corrupted (size|double-linked|top size)", r"assertion", r"stack smashing",
    r"\baborted\b", r"core dumped", r"use-after-free", r"buffer-overflow", r"runtime error",
    r"leak(ed|s)? ", r"\bbug\b", r"traceback",
]
ERROR_PATTERN = r"\berror:"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "fuse: needs a usable /dev/fuse (it mounts keyfs); skipped with the reason when there is none. "
        "Every test that uses the `mount` fixture gets it by itself; a module or test that starts keyfs "
        "to mount without that fixture says `pytestmark = pytest.mark.fuse` (or decorates the test).")


def _fuse_unusable():
    """Why no mount can run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: FUSE tests need it"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable by uid %d" % os.getuid()
    if FUSERMOUNT is None:
        return "fusermount3 is missing"
    return None


def pytest_collection_modifyitems(config, items):
    # A test that uses the mount fixture (directly or through another fixture) needs FUSE: marked
    # here, so that a new module cannot be forgotten.
    for item in items:
        if "mount" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.fuse)
    # Without a usable /dev/fuse (or fusermount3) no mount can run: skip cleanly, with the reason.
    reason = _fuse_unusable()
    if reason is None:
        return
    mark = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("fuse") is not None:
            item.add_marker(mark)


@pytest.fixture(scope="session", autouse=True)
def keyfs_binaries():
    # Missing binaries are a failure, not a skip: CI must never pass without having run.
    missing = binaries_missing()
    if missing:
        pytest.fail("keyfs binaries missing (KEYFS_BUILD_DIR=%r): %s" % (BUILD_DIR, ", ".join(missing)),
                    pytrace=False)
    return KEYFS, KEYFSCTL


@pytest.fixture(scope="session", autouse=True)
def audit_off():
    """No audit events (docs/AUDIT.md) unless a test asks for them (tests/test_audit.py): daemon
    logs then hold only log lines, which other tests count."""
    old = os.environ.get("KEYFS_AUDIT")
    os.environ["KEYFS_AUDIT"] = "off"
    yield
    if old is None:
        os.environ.pop("KEYFS_AUDIT", None)
    else:
        os.environ["KEYFS_AUDIT"] = old


@pytest.fixture(scope="session", autouse=True)
def trust_dir(tmp_path_factory):
    """Where keyfsctl init and trust record the volumes this host trusts (KEYFS_TRUST_DIR): a
    private dir per run, so that the suite never writes /etc/keyfs or ~/.config. Every keyfs and
    keyfsctl the suite starts inherits it; tests of the default locations unset it."""
    d = str(tmp_path_factory.mktemp("trust"))
    old = os.environ.get("KEYFS_TRUST_DIR")
    os.environ["KEYFS_TRUST_DIR"] = d
    try:
        yield d
    finally:
        if old is None:
            os.environ.pop("KEYFS_TRUST_DIR", None)
        else:
            os.environ["KEYFS_TRUST_DIR"] = old


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """The Key Protect emulator's CA and server certificate, made once per run."""
    from kpemu import make_certs
    return make_certs(str(tmp_path_factory.mktemp("kpemu-ca")))


@pytest.fixture
def emu_factory(certs):
    """start(cls=Emulator, key_name="keyfs-root", apikeys=EMU_APIKEYS, **options) -> a running Key Protect
    emulator (tests/kpemu) with a root key `e.kid` (none if key_name is None); options go to the emulator
    (token_ttl=, latency_ms=, deleted_metadata_status=, ...), cls may be a subclass that records more.
    Every emulator started here is stopped at teardown: for tests that need two (host trust) or special ones."""
    from kpemu import Emulator
    started = []

    def start(cls=Emulator, key_name="keyfs-root", **options):
        options.setdefault("apikeys", EMU_APIKEYS)
        e = cls(certs, **options).start()
        started.append(e)
        e.kid = e.create_key(key_name) if key_name else None
        return e

    try:
        yield start
    finally:
        for e in reversed(started):
            e.stop()


@pytest.fixture
def emu(emu_factory):
    """The common case: one emulator with a root key `emu.kid`, knowing the API keys of helpers.EMU_APIKEYS."""
    return emu_factory()


@pytest.fixture
def apikey_file(tmp_path):
    """A 0600 file holding helpers.APIKEY (the emulator's manager), in the 0700 dir tmp_path/secrets."""
    return secret_file(tmp_path / "secrets", "apikey", APIKEY)


@pytest.fixture
def kp_client_env(monkeypatch):
    """What a test of the Key Protect client wants: fast retries (backoff 10..80 ms instead of 1..8 s, a
    test-only knob), no proxy for the emulator on 127.0.0.1, no credentials or notify socket inherited."""
    monkeypatch.setenv("KEYFS_TEST_BACKOFF_SCALE", "0.01")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


@pytest.fixture
def keystore(tmp_path):
    """A keystore directory path; not created: keyfsctl creates it 0700."""
    return str(tmp_path / "keystore")


@pytest.fixture
def volume(tmp_path, keystore):
    """A freshly initialised backing dir with key 'test' created in `keystore`."""
    backing = str(tmp_path / "backing")
    keyfsctl("init", backing, "--kms", "local", "--keystore", keystore, "--key", "test", "--create-key")
    assert os.path.isfile(os.path.join(backing, ".keyfs"))
    return backing


def _read(path):
    try:
        with open(path, "r", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


class Mount:
    """One keyfs daemon we started in the foreground, and its mountpoint."""

    def __init__(self, backing, mnt, opts, logdir, allow_errors=False, extra_args=(), cwd=None):
        # argv gets the paths as given (possibly relative to cwd); checks use absolute ones.
        self.cwd = cwd
        self.argv_paths = (backing, mnt)
        self.backing = os.path.abspath(os.path.join(cwd or os.getcwd(), backing))
        self.mnt = os.path.abspath(os.path.join(cwd or os.getcwd(), mnt))
        self.opts = list(opts)
        self.extra_args = list(extra_args)
        self.logdir = logdir
        self.allow_errors = allow_errors
        self.proc = None
        self.log = None
        self.logs = []          # every daemon log this object produced (remounts append)
        self.problems = []      # reasons to fail the test, collected at unmount

    def argv(self):
        argv = [KEYFS, *self.argv_paths, "-f"] + self.extra_args
        if self.opts:
            argv += ["-o", ",".join(self.opts)]
        return argv

    @property
    def mounted(self):
        return self.proc is not None

    def start(self):
        assert self.proc is None
        assert not is_mounted(self.mnt), "%s is already a mountpoint" % self.mnt
        self.log = os.path.join(self.logdir, "keyfs-%d.log" % len(_all_logs(self.logdir)))
        self.logs.append(self.log)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, close_fds=True, cwd=self.cwd)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                pytest.fail("keyfs exited with %s before mounting %s\nargv: %s\nstderr:\n%s"
                            % (rc, self.mnt, self.argv(), _read(self.log)), pytrace=False)
            # ismount alone is fooled by a dead mount (stat fails): check the mount table too.
            if os.path.ismount(self.mnt) and is_mounted(self.mnt):
                break
            if time.monotonic() > deadline:
                self._stop()
                pytest.fail("keyfs did not mount %s within %d s\nstderr:\n%s"
                            % (self.mnt, MOUNT_TIMEOUT, _read(self.log)), pytrace=False)
            time.sleep(0.02)
        return self

    def _fusermount(self, *flags):
        return subprocess.run([FUSERMOUNT, *flags, "-u", self.mnt], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _stop(self):
        """Unmount OUR mountpoint, wait for OUR pid; kill it only if it hangs. Never raises."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None and is_mounted(self.mnt):
            deadline = time.monotonic() + 5
            while True:
                r = self._fusermount()
                if r.returncode == 0 or not is_mounted(self.mnt):
                    break
                if time.monotonic() > deadline:
                    self.problems.append("fusermount3 -u %s kept failing: %s" % (self.mnt, r.stderr.strip()))
                    self._fusermount("-z")
                    break
                time.sleep(0.05)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.problems.append("keyfs (pid %d) did not exit within 10 s of the unmount: killed" % proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        if rc != 0:
            self.problems.append("keyfs exited with status %s after unmount" % rc)
        if is_mounted(self.mnt):
            # The daemon is gone, so this is a dead mount: lazy-unmount OUR mountpoint.
            self.problems.append("%s still mounted after the daemon exited" % self.mnt)
            self._fusermount("-z")
        self._check_log(self.log)

    def _check_log(self, log):
        text = _read(log)
        pats = list(CRASH_PATTERNS)
        if not self.allow_errors:
            pats.append(ERROR_PATTERN)
        for line in text.splitlines():
            for p in pats:
                if re.search(p, line, re.IGNORECASE):
                    self.problems.append("suspicious daemon output (%s): %s" % (p, line))
                    break

    def umount(self):
        """Unmount now; fails the test at once on any problem."""
        self._stop()
        self.raise_problems()

    def remount(self):
        self.umount()
        return self.start()

    def raise_problems(self):
        if self.problems:
            msg = "\n".join(self.problems)
            self.problems = []
            pytest.fail("%s\nlast daemon log %s:\n%s" % (msg, self.log, _read(self.log)), pytrace=False)

    def path(self, *parts):
        return os.path.join(self.mnt, *parts)

    def bpath(self, *parts):
        return os.path.join(self.backing, *parts)

    def stderr(self):
        return _read(self.log)


def _all_logs(d):
    return [n for n in os.listdir(d) if n.startswith("keyfs-") and n.endswith(".log")]


@pytest.fixture
def mount(request, tmp_path):
    """Factory: mount(backing=None, mnt=None, opts=(), allow_errors=False) -> Mount.

    backing defaults to the `volume` fixture, mnt to a fresh dir. Every mount made here is
    unmounted in the finalizer, whatever happened in the test."""
    mounts = []
    counter = [0]

    def factory(backing=None, mnt=None, opts=(), allow_errors=False, extra_args=(), cwd=None):
        if backing is None:
            backing = request.getfixturevalue("volume")
        if mnt is None:
            counter[0] += 1
            mnt = str(tmp_path / ("mnt" if counter[0] == 1 else "mnt%d" % counter[0]))
            os.makedirs(mnt, exist_ok=True)
        m = Mount(backing, mnt, opts, str(tmp_path), allow_errors=allow_errors, extra_args=extra_args,
                  cwd=cwd)
        mounts.append(m)
        return m.start()

    try:
        yield factory
    finally:
        for m in reversed(mounts):
            m._stop()
        problems = [p for m in mounts for p in m.problems]
        if problems:
            logs = "\n".join("%s:\n%s" % (m.log, _read(m.log)) for m in mounts if m.log)
            pytest.fail("\n".join(problems) + "\n" + logs, pytrace=False)


@pytest.fixture
def mnt(mount):
    """The common case: one mount of a fresh volume."""
    return mount()


@pytest.fixture
def world_tmp():
    """A directory under /tmp that other uids can traverse (pytest's tmp_path is 0700)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="keyfs-test-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        # Never remove anything below a live mount: unmounting is the mount fixture's job,
        # and it runs before this finalizer because fixtures are torn down in reverse order.
        for root, dirs, files in os.walk(d):
            for name in dirs:
                if is_mounted(os.path.join(root, name)):
                    return
        shutil.rmtree(d, ignore_errors=True)
