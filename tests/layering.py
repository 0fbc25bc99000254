#!/usr/bin/env python3
# layering.py: the include and link rules of docs/ARCHITECTURE.md, checked on the build as it was compiled
#
# usage: layering.py SOURCE_ROOT BUILD_ROOT NINJA [--expect-violation RULE]...
#
# Headers are read from ninja's record of what each object really included (`ninja -t deps`), so a
# header reached through another header counts, and nothing is guessed from the text. Link lines are
# read from build.ninja. Exit 0 when every rule holds, 1 with one line per violation otherwise.
# --expect-violation RULE: a rule known to be broken on this branch until another change lands; the
# check passes while it is broken and FAILS once it holds, so that the flag gets removed.
import os
import subprocess
import sys

# Where each third-party header may be included (paths relative to the source root; a folder ends
# in "/"). Everything else is a violation. tests/ may use what it needs, except FUSE outside fs tests.
THIRD_PARTY = {
    "fuse": ("fs/",),
    "curl": ("keyclient/",),
    # OpenSSL: wiping allocators (keyclient/secmem.c); ChaCha20-Poly1305 for the chunks (content/format.c).
    "openssl": ("keyclient/", "content/format.c"),
    # cJSON: the Key Protect client, and the control protocol module (status format and parse).
    "cjson": ("keyclient/", "util/control.c", "control/"),
}
FORMAT_HEADERS = ("include/keyfs/format.h", "include/keyfs/voldesc.h", "include/keyfs/content.h")


def third_party(dep):
    """Which third-party library a header path belongs to, or None."""
    parts = dep.split("/")
    base = parts[-1]
    if "fuse3" in parts or base.startswith("fuse"):
        return "fuse"
    if "curl" in parts:
        return "curl"
    if "openssl" in parts:
        return "openssl"
    if "cjson" in parts or base == "cJSON.h":
        return "cjson"
    return None


def allowed(rel, places):
    return any(rel.startswith(p) if p.endswith("/") else rel == p for p in places)


def object_deps(build, ninja):
    """{source path relative to the source root: [header paths, absolute]} from ninja's deps log."""
    out = subprocess.run([ninja, "-C", build, "-t", "deps"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, check=True).stdout
    result = {}
    cur = None
    for line in out.splitlines():
        if not line.strip():
            cur = None
            continue
        if not line.startswith(" "):
            cur = []
            result[line.split(":", 1)[0]] = cur
            continue
        if cur is not None:
            cur.append(os.path.normpath(os.path.join(build, line.strip())))
    by_source = {}
    for obj, deps in result.items():
        if not deps or not deps[0].endswith(".c"):
            continue
        by_source.setdefault(deps[0], []).extend(deps[1:])
    return by_source


def ninja_statement(build, output):
    """The text of the build statement for `output` in build.ninja, its variable lines included."""
    with open(os.path.join(build, "build.ninja")) as f:
        lines = f.read().split("\n")
    head = "build %s:" % output
    for i, line in enumerate(lines):
        if line.startswith(head):
            j = i + 1
            while j < len(lines) and lines[j].startswith(" "):
                j += 1
            return "\n".join(lines[i:j])
    return None


def main(argv):
    args, expected = [], set()
    it = iter(argv[1:])
    for a in it:
        if a == "--expect-violation":
            expected.add(next(it))
        else:
            args.append(a)
    if len(args) != 3:
        print("usage: layering.py SOURCE_ROOT BUILD_ROOT NINJA [--expect-violation RULE]...", file=sys.stderr)
        return 2
    src, build, ninja = (os.path.realpath(a) if i < 2 else a for i, a in enumerate(args))
    violations = {}         # rule -> [lines]

    def bad(rule, text):
        violations.setdefault(rule, []).append(text)

    deps = object_deps(build, ninja)
    seen = {"keyclient": 0, "fs-fuse": 0}
    for source, headers in sorted(deps.items()):
        rel = os.path.relpath(source, src)
        if rel.startswith(".."):
            continue
        for h in headers:
            hrel = os.path.relpath(h, src)
            lib = third_party(h)
            if lib == "fuse" and rel.startswith("fs/"):
                seen["fs-fuse"] += 1
            if lib and not rel.startswith("tests/") and not allowed(rel, THIRD_PARTY[lib]):
                bad("third-party-" + lib, "%s includes %s (%s headers belong to %s only)"
                    % (rel, h, lib, ", ".join(THIRD_PARTY[lib])))
            if lib == "fuse" and rel.startswith("tests/"):
                bad("third-party-fuse", "%s includes %s (FUSE headers belong to fs/ only)" % (rel, h))
            if rel.startswith("keyclient/") and hrel in FORMAT_HEADERS:
                bad("keyclient-format", "%s includes %s (keyclient must not depend on format or content)"
                    % (rel, hrel))
        if rel.startswith("keyclient/"):
            seen["keyclient"] += 1

    # The check must have seen what it checks: otherwise it would pass on nothing.
    if not seen["keyclient"]:
        bad("self-check", "no keyclient/ object in `ninja -t deps` (build first)")
    if not seen["fs-fuse"]:
        bad("self-check", "no fs/ object includes a FUSE header: the header classification is broken")

    # keyfsctl never links libfuse; the daemon does (the positive control of the parsing).
    ctl = ninja_statement(build, "cli/keyfsctl")
    daemon = ninja_statement(build, "fs/keyfs")
    if ctl is None or daemon is None:
        bad("self-check", "no build statement for cli/keyfsctl or fs/keyfs in build.ninja")
    else:
        if "fuse" not in daemon:
            bad("self-check", "fs/keyfs's link line names no fuse: the link line parsing is broken")
        for line in ctl.split("\n"):
            if "fuse" in line:
                bad("keyfsctl-fuse", "keyfsctl links libfuse: %s" % line.strip()[:300])

    status = 0
    for rule in sorted(set(violations) | expected):
        lines = violations.get(rule, [])
        if rule in expected:
            if lines:
                print("layering: %s: known violation, expected until the change that fixes it lands:" % rule)
                for ln in lines:
                    print("  " + ln)
            else:
                print("layering: %s holds now: remove --expect-violation %s from tests/meson.build" % (rule, rule))
                status = 1
            continue
        for ln in lines:
            print("layering: %s: %s" % (rule, ln))
        status = 1
    if status == 0:
        print("layering: ok (%d objects)" % len(deps))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
