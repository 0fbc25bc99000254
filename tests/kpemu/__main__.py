# __main__.py: run the Key Protect emulator as a process: python3 -m tests.kpemu --port N --apikey-file F
#
# Prints what a volume needs (endpoint, iam_endpoint, ca_file, instance, key, crn) as
# name=value lines, then serves until SIGINT or SIGTERM. Loopback only by default.
import argparse
import os
import signal
import sys
import tempfile
import threading

from .certs import make_certs
from .server import Emulator


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m tests.kpemu",
                                description="IBM Key Protect + IAM emulator for keyfs tests")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    p.add_argument("--apikey-file", action="append", default=[],
                   help="file holding an API key IAM accepts (repeatable); default: make one")
    p.add_argument("--certdir", help="where the CA and server certificate live (made if missing)")
    p.add_argument("--state-file", help="keep keys across restarts in this JSON file")
    p.add_argument("--instance", help="instance GUID (default: random, or the state file's)")
    p.add_argument("--create-key", metavar="NAME", help="create a root key named NAME at start")
    p.add_argument("--token-ttl", type=int, default=3600, help="IAM token lifetime in seconds")
    p.add_argument("--latency-ms", type=int, default=0, help="delay every KMS answer by this much")
    p.add_argument("--rate-limit", type=float, default=0, metavar="N",
                   help="serve at most N KMS requests a second, 429 + Retry-After: 1 for the rest")
    p.add_argument("--no-log", action="store_true", help="keep no request log (counters only: /_emu/stats)")
    p.add_argument("--too-early", action="store_true",
                   help="refuse enable/restore within 30 s of the previous action (REQ_TOO_EARLY_ERR)")
    a = p.parse_args(argv)

    workdir = a.certdir or tempfile.mkdtemp(prefix="kpemu-")
    certs = make_certs(workdir)
    apikeys = {}
    for path in a.apikey_file:
        with open(path) as f:
            apikeys[f.read().strip()] = "manager"
    made_key_file = None
    if not apikeys:
        import secrets
        key = "kpemu-" + secrets.token_urlsafe(24)
        made_key_file = os.path.join(workdir, "apikey")
        fd = os.open(made_key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        apikeys[key] = "manager"
    emu = Emulator(certs, apikeys=apikeys, instance=a.instance, host=a.host, port=a.port,
                   token_ttl=a.token_ttl, enforce_too_early=a.too_early, state_file=a.state_file,
                   latency_ms=a.latency_ms)
    if a.rate_limit:
        emu.set_rate_limit(a.rate_limit)
    emu.quiet_log = a.no_log
    emu.start()
    out = ["endpoint=%s" % emu.url, "iam_endpoint=%s" % emu.url, "ca_file=%s" % certs.ca_file,
           "instance=%s" % emu.instance]
    if made_key_file:
        out.append("apikey_file=%s" % made_key_file)
    if a.create_key:
        kid = emu.create_key(a.create_key)
        out += ["key=%s" % kid, "crn=%s" % emu.key(kid).crn()]
    print("\n".join(out), flush=True)

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
