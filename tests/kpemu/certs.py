# certs.py: a throw-away CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI
import os
import shutil
import subprocess


class Certs:
    """Paths of a CA certificate and of a server key + certificate signed by it."""

    def __init__(self, directory):
        self.dir = directory
        self.ca_file = os.path.join(directory, "ca.pem")
        self.ca_key = os.path.join(directory, "ca.key")
        self.cert_file = os.path.join(directory, "server.pem")
        self.key_file = os.path.join(directory, "server.key")

    def exist(self):
        return all(os.path.isfile(p) for p in (self.ca_file, self.cert_file, self.key_file))


def _openssl(*args, cwd):
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("openssl is not installed: the emulator needs it to make its test CA")
    r = subprocess.run([exe, *args], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("openssl %s failed: %s" % (args[0], r.stderr.strip()))


def make_certs(directory, hosts=("127.0.0.1", "localhost"), days=7):
    """Make (or reuse) a CA and a server certificate valid for hosts in directory."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    c = Certs(directory)
    if c.exist():
        return c
    san = ",".join(("IP:%s" % h) if h.replace(".", "").isdigit() or ":" in h else ("DNS:%s" % h)
                   for h in hosts)
    ext = os.path.join(directory, "server.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectAltName=%s\n" % san)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", str(days),
             "-subj", "/CN=kpemu test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=directory)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", str(days), "-extfile", "server.ext",
             cwd=directory)
    for name in ("ca.key", "server.key"):
        os.chmod(os.path.join(directory, name), 0o600)
    return c
