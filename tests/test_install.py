# test_install.py: what `meson install` puts on a system: the systemd unit, its example config, the man pages
#
# The build under test (KEYFS_BUILD_DIR) is installed into a temporary DESTDIR once per module;
# every path is taken from meson's own view of the build (introspection), never assumed.
import json
import os
import re
import shutil
import subprocess

import pytest

from helpers import BUILD_DIR, KEYFS, KEYFSCTL, project_version, run

# Unit settings that run the service in a namespace of its own. Most of them mean a mount
# namespace (systemd.exec(5) under PrivateMounts=; systemd's exec_needs_mount_namespace()), in
# which the mount keyfs makes would be private to the service, invisible to the host.
NAMESPACE_SETTINGS = [
    "RootDirectory", "RootImage", "RootImageOptions", "RootHash", "RootVerity", "MountAPIVFS",
    "MountImages", "ExtensionImages", "ExtensionDirectories", "BindPaths", "BindReadOnlyPaths",
    "TemporaryFileSystem", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths",
    "NoExecPaths", "MountFlags", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork",
    "NetworkNamespacePath", "PrivateIPC", "IPCNamespacePath", "PrivateUsers", "ProtectSystem",
    "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ProtectHostname", "LogNamespace",
    "DynamicUser", "JoinsNamespaceOf",
]

# Settings that break what keyfs is for, even without a namespace.
FORBIDDEN_SETTINGS = {
    "User": "the daemon must run as root to serve every user and mount with mount(2)",
    "Group": "the daemon must run as root to serve every user and mount with mount(2)",
    "RestrictSUIDSGID": "users may make set-user-id and set-group-id files on the volume",
    "RuntimeDirectory": "every instance shares /run/keyfs: stopping one would remove it for all",
}

MAN_PAGES = ("keyfs.8", "keyfsctl.8")


# The Debian package of each tool these tests need.
PACKAGES = {"meson": "meson", "systemd-analyze": "systemd", "man": "man-db", "groff": "groff-base"}


def need(tool):
    """The path of tool; a missing tool fails the test in CI and skips it elsewhere."""
    path = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        msg = "%s is missing (Debian package %s): it checks the installed files" % (tool, PACKAGES[tool])
        if os.environ.get("CI") == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return path


def meson_json(meson, *args):
    r = run([meson, "introspect", *args, BUILD_DIR], timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class Install:
    """One `meson install --destdir` of the build under test."""

    def __init__(self, destdir, installed, options):
        self.destdir = destdir
        self.installed = installed          # build or source path -> absolute install path
        self.options = options              # meson option name -> value

    def where(self, suffix):
        """The install path (on the target system) of the one installed file whose path ends
        with suffix."""
        hits = [dst for dst in self.installed.values() if dst.endswith(suffix)]
        assert len(hits) == 1, "installed files ending in %r: %r" % (suffix, sorted(self.installed.values()))
        return hits[0]

    def path(self, target_path):
        """Where a file installed at target_path is in the DESTDIR tree."""
        return os.path.join(self.destdir, target_path.lstrip("/"))

    def read(self, suffix):
        with open(self.path(self.where(suffix)), encoding="utf-8") as f:
            return f.read()


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    meson = need("meson")
    destdir = str(tmp_path_factory.mktemp("destdir"))
    r = run([meson, "install", "-C", BUILD_DIR, "--no-rebuild", "--quiet", "--destdir", destdir], timeout=120)
    assert r.returncode == 0, "meson install failed:\n%s%s" % (r.stdout, r.stderr)
    installed = meson_json(meson, "--installed")
    options = {o["name"]: o["value"] for o in meson_json(meson, "--buildoptions")}
    return Install(destdir, installed, options)


def unit_settings(text):
    """The unit file as (section, key, value) triples, in order; comments and blank lines dropped."""
    out, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            section = m.group(1)
            continue
        key, sep, value = line.partition("=")
        assert sep and section, "not a unit file line: %r" % line
        out.append((section, key.strip(), value.strip()))
    return out


def values(settings, section, key):
    return [v for s, k, v in settings if s == section and k == key]


def expected_unitdir(inst):
    if inst.options.get("systemdunitdir"):
        return inst.options["systemdunitdir"]
    pkgconfig = shutil.which("pkg-config")
    if pkgconfig:
        r = run([pkgconfig, "--variable=systemdsystemunitdir", "systemd"])
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    return os.path.join(inst.options["prefix"], "lib/systemd/system")


def prefixed(inst, option):
    return os.path.join(inst.options["prefix"], inst.options[option])


# ---- where things land ----

def test_files_land_where_expected(inst):
    bindir = prefixed(inst, "bindir")
    assert inst.where("/keyfs") == os.path.join(bindir, "keyfs")
    assert inst.where("/keyfsctl") == os.path.join(bindir, "keyfsctl")
    assert inst.where("/keyfs@.service") == os.path.join(expected_unitdir(inst), "keyfs@.service")
    assert inst.where("/example.conf") == os.path.join(prefixed(inst, "datadir"), "doc/keyfs/examples/example.conf")
    for page in MAN_PAGES:
        assert inst.where("/" + page) == os.path.join(prefixed(inst, "mandir"), "man8", page)
    for suffix in ("/keyfs", "/keyfsctl", "/keyfs@.service", "/example.conf") + tuple("/" + p for p in MAN_PAGES):
        assert os.path.isfile(inst.path(inst.where(suffix))), suffix


# ---- the unit ----

def test_unit_runs_the_installed_keyfs(inst):
    text = inst.read("/keyfs@.service")
    assert not re.search(r"@[A-Za-z_]+@", text), "unsubstituted @var@ in the unit"
    s = unit_settings(text)
    keyfs = inst.where("/keyfs")
    assert values(s, "Service", "ExecStart") == [keyfs + " -f ${BACKING} ${MOUNTPOINT} -o ${OPTIONS}"]
    assert os.access(inst.path(keyfs), os.X_OK)
    assert values(s, "Service", "Type") == ["notify"]
    assert values(s, "Service", "NotifyAccess") == ["main"]
    # No '-': a missing configuration must fail the unit.
    assert values(s, "Service", "EnvironmentFile") == ["/etc/keyfs/%i.conf"]
    assert values(s, "Service", "LoadCredential") == ["apikey:/etc/keyfs/%i.apikey"]
    # The fallback that lets a local keystore volume start without an API key file: one
    # newline, which keyfs reads as an empty key.
    assert values(s, "Service", "SetCredential") == ["apikey:\\n"]
    assert values(s, "Service", "Restart") == ["on-failure"]
    assert values(s, "Install", "WantedBy") == ["remote-fs.target"]


def test_unit_limits(inst):
    s = unit_settings(inst.read("/keyfs@.service"))
    assert values(s, "Service", "LimitCORE") == ["0"]
    assert values(s, "Service", "LimitMEMLOCK") == ["infinity"]
    assert values(s, "Service", "LimitNOFILE") == ["1048576"]


def test_unit_hardening_keeps_the_mount_visible(inst):
    s = unit_settings(inst.read("/keyfs@.service"))
    keys = {k for _, k, _ in s}
    assert not keys & set(NAMESPACE_SETTINGS), "namespace settings: %s" % sorted(keys & set(NAMESPACE_SETTINGS))
    for key, why in FORBIDDEN_SETTINGS.items():
        assert key not in keys, "%s= is set, but %s" % (key, why)
    caps = " ".join(values(s, "Service", "CapabilityBoundingSet")).split()
    assert "CAP_SYS_ADMIN" in caps and "CAP_DAC_OVERRIDE" in caps and "CAP_CHOWN" in caps
    assert "CAP_DAC_READ_SEARCH" in caps    # open_by_handle_at: reopening evicted inode fds
    assert "CAP_SETUID" not in caps and "CAP_SYS_PTRACE" not in caps and "CAP_SYS_MODULE" not in caps
    assert values(s, "Service", "NoNewPrivileges") == ["yes"]
    assert values(s, "Service", "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6"]
    assert values(s, "Service", "DevicePolicy") == ["closed"]
    assert "/dev/fuse rw" in values(s, "Service", "DeviceAllow")
    assert values(s, "Service", "SystemCallFilter") == ["@system-service @mount"]


def test_systemd_analyze_verify_accepts_the_installed_unit(inst, tmp_path):
    analyze = need("systemd-analyze")
    need("man")     # verify checks that the man pages of Documentation= exist
    unitdir = os.path.dirname(inst.where("/keyfs@.service"))
    # The DESTDIR is the root: the unit is verified as installed, its ExecStart binary and its
    # man pages included. Only sysinit.target, which every service requires, is missing there.
    stubdir = os.path.join(inst.destdir, "etc/systemd/system")
    os.makedirs(stubdir, exist_ok=True)
    with open(os.path.join(stubdir, "sysinit.target"), "w") as f:
        f.write("[Unit]\nDescription=stand-in for the test\n")
    env = dict(os.environ, MANPATH=inst.path(prefixed(inst, "mandir")), SYSTEMD_LOG_LEVEL="notice")
    env.pop("SYSTEMD_UNIT_PATH", None)
    target = "keyfs@data.service"
    if unitdir not in ("/etc/systemd/system", "/usr/local/lib/systemd/system", "/lib/systemd/system",
                       "/usr/lib/systemd/system"):
        target = os.path.join(inst.path(unitdir), target)
    r = subprocess.run([analyze, "verify", "--root=" + inst.destdir, target], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=60,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout
    about_us = [line for line in r.stdout.splitlines() if "keyfs" in line]
    assert about_us == [], "\n".join(about_us)


# ---- the example configuration ----

def test_example_config_is_what_the_unit_reads(inst):
    text = inst.read("/example.conf")
    assigned = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z_]+)=(\S*)", line)
        assert m, "not a NAME=value line for EnvironmentFile=: %r" % line
        assigned[m.group(1)] = m.group(2)
    assert sorted(assigned) == ["BACKING", "MOUNTPOINT", "OPTIONS"]
    assert os.path.isabs(assigned["BACKING"]) and os.path.isabs(assigned["MOUNTPOINT"])
    # keyfs accepts the example's options: it gets past them to the missing backing dir (3),
    # not to a usage error (2).
    r = run([KEYFS, "/nonexistent/keyfs-backing", "/nonexistent/keyfs-mnt", "-f", "-o", assigned["OPTIONS"]])
    assert r.returncode == 3, r.stderr


# ---- the man pages ----

def render(inst, page):
    """The page as installed, as plain text without hyphenation or line breaks inside lines."""
    groff = need("groff")
    r = run([groff, "-man", "-Tascii", "-P-cbou", "-rLL=2000n", "-rHY=0", "-rcR=1",
             inst.path(inst.where("/" + page))])
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_renders_without_warnings(inst, page):
    groff = need("groff")
    path = inst.path(inst.where("/" + page))
    with open(path, "rb") as f:
        raw = f.read()
    assert raw.isascii(), "non-ASCII bytes in %s" % page
    assert not re.search(rb"@[A-Za-z_]+@", raw), "unsubstituted @VAR@ in %s" % page
    r = run([groff, "-man", "-ww", "-z", path])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "keyfs %s" % project_version() in render(inst, page)


def test_keyfs_man_page_names_every_mount_option(inst):
    text = render(inst, "keyfs.8")
    help_text = run([KEYFS, "--help"]).stdout
    options = set(re.findall(r"^\s+-o ([a-z_]+)", help_text, re.M))
    passed = re.search(r"FUSE options passed through:(.*?)\. fstab-only", help_text, re.S)
    ignored = re.search(r"accepted and\s+ignored:(.*?)\n\n", help_text, re.S)
    assert options and passed and ignored, help_text
    for item in (passed.group(1) + "," + ignored.group(1)).split(","):
        item = item.strip().rstrip(".")
        options.add(item.replace("...", ""))
    assert {"poll", "grace", "allow_other", "auto_unmount", "_netdev", "comment=", "x-"} <= options
    missing = [o for o in sorted(options) if not re.search(r"(?<![\w-])%s(?![\w])" % re.escape(o), text)]
    assert missing == [], "keyfs(8) does not document: %s" % missing
    for flag in ("-f", "-d", "-o", "--help", "--version"):
        assert re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), text), flag


def test_keyfs_man_page_names_the_installed_paths(inst):
    text = render(inst, "keyfs.8")
    assert inst.where("/keyfs@.service") in text
    assert inst.where("/example.conf") in text
    for path in ("/etc/keyfs/NAME.conf", "/etc/keyfs/NAME.apikey", "/run/keyfs/ID.sock", "/var/lib/keyfs/keystore",
                 "keyfs@NAME.service", "fuse.keyfs apikey_file=F,nofail,_netdev 0 0"):
        assert path in text, path


def test_keyfsctl_man_page_names_every_command(inst):
    text = render(inst, "keyfsctl.8")
    help_text = run([KEYFSCTL, "--help"]).stdout
    usages = re.findall(r"^\s+keyfsctl ([a-z]+)\b(.*)$", help_text, re.M)
    commands = {c for c, _ in usages}
    assert {"init", "inspect", "status", "key", "help"} <= commands, help_text
    for cmd in sorted(commands):
        assert re.search(r"^\s*keyfsctl %s\b" % cmd, text, re.M), "keyfsctl(8) has no synopsis of '%s'" % cmd
    actions = re.search(r"^\s+keyfsctl key ([a-z|]+) NAME", help_text, re.M)
    assert actions, help_text
    for action in actions.group(1).split("|"):
        assert re.search(r"^\s*keyfsctl key %s NAME" % action, text, re.M), "no 'keyfsctl key %s'" % action
    # Every option a usage line names.
    opts = {o for _, args in usages for o in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", args)}
    missing = [o for o in sorted(opts) if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(o), text)]
    assert missing == [], "keyfsctl(8) does not document: %s" % missing
    for code in range(11):
        assert re.search(r"^\s+%d\s+\S" % code, text, re.M), "exit status %d" % code
