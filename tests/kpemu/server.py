# server.py: a Key Protect + IAM emulator speaking shared/keyprotect-api.md over HTTPS, with fault injection
#
# Python standard library only. One ThreadingHTTPServer answers the IAM token endpoint, the
# /api/v2/keys API and a control API under /_emu/ (no auth: loopback test tool). Keys have
# versions and states; wrap really encrypts (HMAC-SHA256 keystream + HMAC-SHA256 tag,
# encrypt-then-MAC, one secret per key version), so a wrong AAD or a foreign ciphertext fails
# the way the service fails. Not a security product: a test double.
import base64
import binascii
import copy
import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import socket
import ssl
import struct
import threading
import time
import urllib.parse
import uuid

MORE_INFO = "https://cloud.ibm.com/apidocs/key-protect"
KEY_TYPE = "application/vnd.ibm.kms.key+json"
ERROR_TYPE = "application/vnd.ibm.kms.error+json"
GRANT_APIKEY = "urn:ibm:params:oauth:grant-type:apikey"
UNAUTHORIZED_MSG = "Unauthorized: The user does not have access to the specified resource"
REASON = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
          405: "Method Not Allowed", 409: "Conflict", 410: "Gone", 413: "Payload Too Large",
          422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
          501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
          504: "Gateway Timeout"}
STATUS_CODES = {429: "TOO_MANY_REQUESTS_ERR", 500: "INTERNAL_SERVER_ERR", 501: "NOT_IMPLEMENTED_ERR",
                502: "BAD_GATEWAY_ERR", 503: "SERVICE_UNAVAILABLE_ERR", 504: "GATEWAY_TIMEOUT_ERR",
                400: "BAD_REQUEST_ERR", 401: "UNAUTHORIZED_ERR", 403: "FORBIDDEN_ERR",
                404: "NOT_FOUND_ERR", 409: "CONFLICT_ERR"}
MAX_REQUEST_BODY = 1 << 20
AAD_STRING_MAX = 255
ROLES = ("manager", "writer", "reader", "none")


def rfc3339(t=None):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def b64e(b):
    return base64.b64encode(b).decode("ascii")


def b64d(s):
    if not isinstance(s, str):
        raise ValueError("not a string")
    return base64.b64decode(s.encode("ascii"), validate=True)


class ApiError(Exception):
    def __init__(self, status, code, message, target=None):
        super().__init__(message)
        self.status, self.code, self.message, self.target = status, code, message, target


# ---- the toy AEAD: encrypt-then-MAC from HMAC-SHA256 ----

def _keystream(key, iv, n):
    out = b""
    counter = 0
    while len(out) < n:
        out += hmac.new(key, iv + counter.to_bytes(4, "big"), hashlib.sha256).digest()
        counter += 1
    return out[:n]


def _ad_bytes(aad):
    out = b"kpemu-wrap-v1"
    for s in aad:
        b = s.encode("utf-8")
        out += len(b).to_bytes(2, "big") + b
    return out


def seal(secret, handle, plaintext, aad):
    enc = hmac.new(secret, b"enc", hashlib.sha256).digest()
    mac = hmac.new(secret, b"mac", hashlib.sha256).digest()
    iv = os.urandom(16)
    ct = bytes(a ^ b for a, b in zip(plaintext, _keystream(enc, iv, len(plaintext))))
    tag = hmac.new(mac, iv + _ad_bytes(aad) + ct, hashlib.sha256).digest()[:16]
    inner = {"ciphertext": b64e(ct + tag), "iv": b64e(iv), "version": "4.0.0", "handle": handle}
    return b64e(json.dumps(inner, separators=(",", ":")).encode())


def parse_blob(blob):
    """(handle, iv, ct+tag) of a ciphertext string, or ApiError 400."""
    try:
        inner = json.loads(b64d(blob))
        handle = inner["handle"]
        iv = b64d(inner["iv"])
        body = b64d(inner["ciphertext"])
        if not isinstance(handle, str) or len(iv) != 16 or len(body) < 17:
            raise ValueError("bad fields")
        return handle, iv, body
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "INVALID_FIELD_ERR", "The field 'ciphertext' must be: a valid ciphertext",
                       {"type": "field", "name": "ciphertext"})


def open_sealed(secret, iv, body, aad):
    enc = hmac.new(secret, b"enc", hashlib.sha256).digest()
    mac = hmac.new(secret, b"mac", hashlib.sha256).digest()
    ct, tag = body[:-16], body[-16:]
    want = hmac.new(mac, iv + _ad_bytes(aad) + ct, hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(tag, want):
        raise ApiError(400, "INVALID_FIELD_ERR",
                       "The field 'ciphertext' must be: the original base64 encoded ciphertext "
                       "from the wrap operation, with the same additional authentication data",
                       {"type": "field", "name": "ciphertext"})
    return bytes(a ^ b for a, b in zip(ct, _keystream(enc, iv, len(ct))))


# ---- keys ----

class Key:
    def __init__(self, kid, name, instance, state=1, extractable=False, description=None):
        now = time.time()
        self.id = kid
        self.name = name
        self.instance = instance
        self.state = state
        self.extractable = extractable
        self.description = description
        self.created = now
        self.updated = now
        self.last_action = 0.0          # time of the last disable/enable/delete/restore
        self.rotated = 0.0
        self.deleted = False
        self.deletion_date = None
        self.purged = False
        self.versions = []              # [{"id", "secret", "created"}], oldest first
        self.aliases = []               # unique in the instance; a path <id> may be one
        self.add_version()

    def add_version(self):
        v = {"id": str(uuid.uuid4()), "secret": os.urandom(32), "created": time.time()}
        self.versions.append(v)
        return v

    @property
    def latest(self):
        return self.versions[-1]

    def version(self, vid):
        for v in self.versions:
            if v["id"] == vid:
                return v
        return None

    def crn(self):
        return "crn:v1:bluemix:public:kms:local:a/kpemu:%s:key:%s" % (self.instance, self.id)

    def resource(self):
        r = {"type": KEY_TYPE, "id": self.id, "name": self.name, "state": self.state,
             "crn": self.crn(), "extractable": self.extractable, "imported": False,
             "algorithmType": "AES", "createdBy": "kpemu", "creationDate": rfc3339(self.created),
             "lastUpdateDate": rfc3339(self.updated),
             "keyVersion": {"id": self.latest["id"], "creationDate": rfc3339(self.latest["created"])},
             "dualAuthDelete": {"enabled": False}, "deleted": self.deleted,
             "restoreAllowed": self.deleted}
        if self.description:
            r["description"] = self.description
        aliases = getattr(self, "aliases", [])
        if aliases:
            r["aliases"] = list(aliases)
            r["aliasCount"] = len(aliases)
        if self.rotated:
            r["lastRotateDate"] = rfc3339(self.rotated)
        if self.deleted:
            r["deletionDate"] = rfc3339(self.deletion_date)
            r["deletedBy"] = "kpemu"
        return r

    def to_json(self):
        d = {k: getattr(self, k) for k in ("id", "name", "instance", "state", "extractable",
                                             "description", "created", "updated", "last_action",
                                             "rotated", "deleted", "deletion_date", "purged",
                                             "aliases")}
        d["versions"] = [{"id": v["id"], "secret": v["secret"].hex(), "created": v["created"]}
                         for v in self.versions]
        return d

    @classmethod
    def from_json(cls, d):
        k = cls.__new__(cls)
        for name, value in d.items():
            if name != "versions":
                setattr(k, name, value)
        k.versions = [{"id": v["id"], "secret": bytes.fromhex(v["secret"]), "created": v["created"]}
                      for v in d["versions"]]
        k.aliases = list(d.get("aliases") or [])
        return k


def collection(ctype, resources):
    return {"metadata": {"collectionType": ctype, "collectionTotal": len(resources)},
            "resources": resources}


def error_body(status, code, message, target=None):
    reason = {"code": code, "message": message, "status": status, "moreInfo": MORE_INFO}
    if target:
        reason["target"] = target
    return collection(ERROR_TYPE, [{"errorMsg": "%s: %s (%s)" % (REASON.get(status, "Error"), message, code),
                                    "reasons": [reason]}])


def unauthorized_body():
    # A 401 carries only errorMsg, as the service sends it.
    return collection(ERROR_TYPE, [{"errorMsg": UNAUTHORIZED_MSG}])


# ---- faults ----

FAULT_KINDS = ("status", "drop", "malformed", "oversize", "latency", "expire_tokens", "down")


class Fault:
    """One injected misbehaviour. count: how many matching requests it hits (-1: all);
    skip: how many matching requests pass untouched first; match: 'kms', 'iam', 'any' or a
    path substring.

    'down' is the service unreachable, for every client, until the fault is cleared or, with
    seconds, until they have passed: new connections are reset at accept (before TLS, as a
    firewall's tcp-reset), and IAM/KMS requests on connections already open are dropped. The
    control API still answers on connections already open; count, skip and match do not apply."""

    def __init__(self, kind, count=1, match="kms", status=500, retry_after=None, ms=0, skip=0,
                 size=100 * 1024, seconds=None):
        if kind not in FAULT_KINDS:
            raise ValueError("unknown fault kind %r (one of %s)" % (kind, ", ".join(FAULT_KINDS)))
        if kind == "down":
            count, match, skip = -1, "any", 0
        self.kind, self.count, self.match, self.status = kind, int(count), match, int(status)
        self.retry_after, self.ms, self.skip, self.size = retry_after, int(ms), int(skip), int(size)
        self.seconds = None if seconds is None else float(seconds)
        self.until = None if seconds is None else time.monotonic() + self.seconds
        self.hits = 0

    def active(self):
        return self.count != 0 and (self.until is None or time.monotonic() < self.until)

    def matches(self, kind, path):
        if self.match in ("any", "*"):
            return True
        if self.match in ("kms", "iam"):
            return self.match == kind
        return self.match in path

    def to_json(self):
        return {k: getattr(self, k) for k in ("kind", "count", "match", "status", "retry_after", "ms",
                                              "skip", "size", "seconds", "hits")}


# ---- the server ----

class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops SYNs of a burst of clients: 1 s retransmits.
    request_queue_size = 128

    def __init__(self, addr, handler, emu, context):
        self.emu = emu
        self.context = context
        super().__init__(addr, handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        if self.emu._down():
            # Reset, not a polite close: the client sees what a firewall's tcp-reset gives.
            with self.emu.lock:
                self.emu.resets += 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            raise OSError("kpemu is down: connection reset")     # socketserver skips this accept
        # Headers and body leave in separate writes: without this, Nagle + delayed ACK add 40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.emu.lock:
            self.emu.connections += 1
        # The TLS handshake runs in the request's thread, so one slow client blocks nobody.
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):
        # Handshake failures (a client that does not trust us) and resets are expected in tests.
        import sys
        self.emu._note_error(sys.exc_info()[1])


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kpemu/1"
    timeout = 60

    def setup(self):
        super().setup()
        self.request.settimeout(self.timeout)
        self.request.do_handshake()

    def log_message(self, fmt, *args):
        pass

    # Every method goes through one dispatcher.
    def do_GET(self):
        self.server.emu._dispatch(self)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET


class Emulator:
    """Key Protect + IAM emulator. Use start()/stop() or a with-block."""

    def __init__(self, certs, apikeys=None, instance=None, host="127.0.0.1", port=0, token_ttl=3600,
                 enforce_too_early=False, too_early_seconds=30, enforce_rotation_limit=False,
                 deleted_metadata_status=200, state_file=None, latency_ms=0):
        if apikeys is None:
            apikeys = {"kpemu-test-api-key": "manager"}
        elif isinstance(apikeys, (list, tuple, set)):
            apikeys = {k: "manager" for k in apikeys}
        for role in apikeys.values():
            if role not in ROLES:
                raise ValueError("unknown role %r (one of %s)" % (role, ", ".join(ROLES)))
        self.certs = certs
        self.apikeys = dict(apikeys)
        self.instance = instance or str(uuid.uuid4())
        self.host = host
        self.port = port
        self.token_ttl = token_ttl
        self.enforce_too_early = enforce_too_early
        self.too_early_seconds = too_early_seconds
        self.enforce_rotation_limit = enforce_rotation_limit
        self.deleted_metadata_status = deleted_metadata_status
        self.state_file = state_file
        self.lock = threading.RLock()
        self.keys = {}
        self.tokens = {}                # token -> {"apikey", "expires"}
        self.issued_tokens = []         # every token ever issued, for leak checks
        self.deks = []                  # every DEK wrap was given or unwrap returned, for memory scans
        self.faults = []
        self.latency = {"kms": latency_ms, "iam": 0}
        self.log = []
        self.errors = []
        self.connections = 0            # TCP connections accepted: shows connection reuse
        self.resets = 0                 # connections reset at accept while 'down'
        self.call_counts = {}           # KMS requests by what they ask ("wrap", "unwrap", "metadata", ...)
        self.rate_limited = 0           # KMS requests answered 429 by the rate limit
        self.rate = None                # {"per_second", "burst", "retry_after", "tokens", "at"} or None
        self.quiet_log = False          # True: keep no request log (a benchmark's thousands of calls)
        self._server = None
        self._thread = None
        if state_file and os.path.exists(state_file):
            self._load()

    # ---- lifecycle ----

    def start(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.certs.cert_file, self.certs.key_file)
        self._server = _Server((self.host, self.port), _Handler, self, ctx)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kpemu",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def serve_forever(self):
        """Run in the calling thread (standalone use) until shutdown() from another thread."""
        self._thread = threading.current_thread()
        self._server.serve_forever(poll_interval=0.2)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self):
        host = self.host if ":" not in self.host else "[%s]" % self.host
        return "https://%s:%d" % (host, self.port)

    endpoint = iam_endpoint = url

    @property
    def ca_file(self):
        return self.certs.ca_file

    # ---- state helpers (Python API, also behind /_emu/) ----

    def create_key(self, name="keyfs-root", state=1, extractable=False, description=None):
        with self.lock:
            k = Key(str(uuid.uuid4()), name, self.instance, state=state, extractable=extractable,
                    description=description)
            self.keys[k.id] = k
            self._save()
            return k.id

    def key(self, kid):
        with self.lock:
            return self.keys[kid]

    def key_state(self, kid):
        with self.lock:
            k = self.keys[kid]
            return 404 if k.purged else k.state

    def set_state(self, kid, state):
        with self.lock:
            k = self.keys[kid]
            k.state = state
            k.deleted = state == 5
            k.deletion_date = time.time() if k.deleted else None
            k.updated = time.time()
            self._save()

    def key_action(self, kid, action):
        """rotate, disable, enable, delete, restore, purge: as the API does them, minus auth."""
        with self.lock:
            k = self._find(kid)
            if action == "rotate":
                self._rotate(k)
            elif action in ("disable", "enable"):
                self._enable_disable(k, action)
            elif action == "delete":
                self._delete(k)
            elif action == "restore":
                self._restore(k)
            elif action == "purge":
                self._purge(k)
            else:
                raise ApiError(400, "INVALID_QUERY_PARAM_ERR", "unknown action %r" % action)
            self._save()

    def add_fault(self, kind, **kw):
        f = Fault(kind, **kw)
        with self.lock:
            self.faults.append(f)
        return f

    def clear_faults(self):
        with self.lock:
            self.faults = []

    def go_down(self, seconds=None):
        """The service unreachable until come_up() (or clear_faults()), or for seconds."""
        return self.add_fault("down", seconds=seconds)

    def come_up(self):
        with self.lock:
            self.faults = [f for f in self.faults if f.kind != "down"]

    def _down(self):
        with self.lock:
            return any(f.kind == "down" and f.active() for f in self.faults)

    def set_rate_limit(self, per_second, burst=None, retry_after=1):
        """Serve at most per_second KMS requests a second (a token bucket of burst, default a tenth
        of a second's worth, at least 1); the others get 429 with Retry-After: retry_after (seconds,
        None: no header). per_second 0 or None: no limit. Polls count too, as at the service."""
        with self.lock:
            if not per_second:
                self.rate = None
                return
            per_second = float(per_second)
            if per_second <= 0:
                raise ValueError("per_second must be positive")
            burst = max(1.0, per_second / 10) if burst is None else float(burst)
            self.rate = {"per_second": per_second, "burst": burst, "retry_after": retry_after,
                         "tokens": burst, "at": time.monotonic()}

    def _rate_ok(self):
        """Called with the lock held: take a token, or False when the bucket is empty."""
        r = self.rate
        if r is None:
            return True
        now = time.monotonic()
        r["tokens"] = min(r["burst"], r["tokens"] + (now - r["at"]) * r["per_second"])
        r["at"] = now
        if r["tokens"] >= 1:
            r["tokens"] -= 1
            return True
        self.rate_limited += 1
        return False

    def kms_calls(self):
        """KMS requests so far by what they asked: {"wrap": n, "unwrap": n, "metadata": n, ...}
        (rate-limited and faulted ones included), without the request log's cost."""
        with self.lock:
            return dict(self.call_counts)

    def set_latency(self, ms, match="kms"):
        with self.lock:
            self.latency[match] = int(ms)

    def expire_tokens(self):
        with self.lock:
            for t in self.tokens.values():
                t["expires"] = 0

    def requests(self, kind=None, path=None, method=None):
        with self.lock:
            return [copy.deepcopy(e) for e in self.log
                    if (kind is None or e["kind"] == kind) and (path is None or path in e["path"])
                    and (method is None or e["method"] == method)]

    def token_requests(self):
        return self.requests(kind="iam")

    def clear_log(self):
        with self.lock:
            self.log = []

    def _note_error(self, exc):
        with self.lock:
            self.errors.append(repr(exc))

    # ---- persistence (standalone demos) ----

    def _save(self):
        if not self.state_file:
            return
        doc = {"instance": self.instance, "keys": [k.to_json() for k in self.keys.values()]}
        tmp = self.state_file + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.state_file)

    def _load(self):
        with open(self.state_file) as f:
            doc = json.load(f)
        self.instance = doc["instance"]
        for d in doc["keys"]:
            k = Key.from_json(d)
            self.keys[k.id] = k

    # ---- request handling ----

    def _dispatch(self, h):
        url = urllib.parse.urlsplit(h.path)
        path = url.path
        length = h.headers.get("content-length")
        try:
            n = int(length) if length else 0
        except ValueError:
            n = -1
        if n < 0 or n > MAX_REQUEST_BODY:
            self._send_json(h, 413, error_body(413, "BODY_TOO_LARGE_ERR", "request body too large"))
            h.close_connection = True
            return
        body = h.rfile.read(n) if n else b""

        if path.startswith("/_emu/"):
            return self._control(h, h.command, path, body)
        kind = "iam" if path in ("/identity/token", "/oidc/token") else "kms"
        entry = {"t": time.time(), "kind": kind, "method": h.command, "path": path, "query": url.query,
                 "headers": {k.lower(): v for k, v in h.headers.items() if k.lower() != "authorization"},
                 "has_auth": "authorization" in (k.lower() for k in h.headers.keys()),
                 "correlation_id": h.headers.get("correlation-id"), "status": None, "fault": None}
        with self.lock:
            if not self.quiet_log:
                self.log.append(entry)
            if kind == "kms":
                what = path.rstrip("/").rsplit("/", 1)[-1] if "/actions/" in path or path.endswith("/metadata") \
                    else "other"
                self.call_counts[what] = self.call_counts.get(what, 0) + 1
            limited = kind == "kms" and not self._rate_ok()
            latency = self.latency.get(kind, 0)
            # While down, nothing else happens: the request never reaches the service.
            fault = next((f for f in self.faults if f.kind == "down" and f.active()), None)
            if fault is not None:
                fault.hits += 1
            for f in self.faults if fault is None else ():
                if f.kind == "down" or f.count == 0 or not f.matches(kind, path):
                    continue
                if f.skip > 0:
                    f.skip -= 1
                    continue
                if f.count > 0:
                    f.count -= 1
                f.hits += 1
                fault = f
                break
        if limited and (fault is None or fault.kind != "down"):
            # Pushed back at once, as a rate limiter in front of the service answers: no latency.
            entry["fault"] = "ratelimit"
            ra = self.rate["retry_after"] if self.rate else None
            extra = {} if ra is None else {"Retry-After": str(ra)}
            return self._send_json(h, 429, error_body(429, "TOO_MANY_REQUESTS_ERR", "rate limit exceeded"),
                                   entry, extra)
        if latency and (fault is None or fault.kind != "down"):
            time.sleep(latency / 1000.0)
        if fault is not None:
            entry["fault"] = fault.kind
            if fault.kind == "latency":
                time.sleep(fault.ms / 1000.0)
            elif fault.kind == "expire_tokens":
                self.expire_tokens()
            elif fault.kind in ("drop", "down"):
                entry["status"] = "dropped"
                h.close_connection = True
                try:
                    h.request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            elif fault.kind == "malformed":
                return self._send_raw(h, 200, b'{"ciphertext": "eyJjaXBoZXJ0ZXh0Ijo', entry,
                                      "application/json")
            elif fault.kind == "oversize":
                pad = b'{"pad":"' + b"A" * max(0, fault.size - 10) + b'"}'
                return self._send_raw(h, 200, pad, entry, "application/json")
            elif fault.kind == "status":
                extra = {}
                if fault.retry_after is not None:
                    extra["Retry-After"] = str(fault.retry_after)
                if kind == "iam":
                    doc = {"errorCode": "BXNIM0%d" % fault.status, "errorMessage": "injected fault",
                           "context": {"requestId": str(uuid.uuid4())}}
                elif fault.status == 401:
                    doc = unauthorized_body()
                else:
                    doc = error_body(fault.status, STATUS_CODES.get(fault.status, "INJECTED_ERR"),
                                     "injected fault")
                return self._send_json(h, fault.status, doc, entry, extra)
        try:
            if kind == "iam":
                status, doc, extra = self._iam(h, path, body)
            else:
                status, doc, extra = self._kms(h, url, body)
        except ApiError as e:
            status, doc, extra = e.status, error_body(e.status, e.code, e.message, e.target), {}
            if e.status == 401:
                doc = unauthorized_body()
        self._send_json(h, status, doc, entry, extra)

    def _send_raw(self, h, status, data, entry=None, ctype="application/json", extra=None):
        if entry is not None:
            entry["status"] = status
        h.send_response(status)
        if status not in (204, 304):
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(data)))
        cid = h.headers.get("correlation-id")
        if cid:
            h.send_header("Correlation-Id", cid)
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _send_json(self, h, status, doc, entry=None, extra=None):
        data = b"" if doc is None else json.dumps(doc).encode()
        self._send_raw(h, status, data, entry, "application/json", extra)

    # ---- IAM ----

    def _iam(self, h, path, body):
        if h.command != "POST":
            return 405, {"errorCode": "BXNIM0405E", "errorMessage": "Method not allowed"}, {}
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        grant = form.get("grant_type", [""])[0]
        apikey = form.get("apikey", [""])[0]
        ctx = {"requestId": str(uuid.uuid4()), "requestType": "incoming.Identity_Token",
               "url": self.url, "instanceId": "kpemu", "threadId": "1", "host": "kpemu",
               "startTime": rfc3339(), "endTime": rfc3339(), "elapsedTime": "0",
               "locale": "en_US", "clusterName": "kpemu"}
        if grant != GRANT_APIKEY:
            return 400, {"errorCode": "BXNIM0109E", "errorMessage": "Property missing or empty.",
                         "context": ctx}, {}
        if not apikey:
            return 400, {"errorCode": "BXNIM0109E", "errorMessage": "Property missing or empty.",
                         "context": ctx}, {}
        with self.lock:
            if apikey not in self.apikeys:
                return 400, {"errorCode": "BXNIM0415E",
                             "errorMessage": "Provided API key could not be found.", "context": ctx}, {}
            token = "kpemu." + secrets.token_urlsafe(48)
            now = int(time.time())
            self.tokens[token] = {"apikey": apikey, "expires": now + self.token_ttl}
            self.issued_tokens.append(token)
        return 200, {"access_token": token, "refresh_token": "not_supported", "ims_user_id": 1,
                     "token_type": "Bearer", "expires_in": self.token_ttl,
                     "expiration": now + self.token_ttl, "scope": "ibm openid"}, {}

    # ---- KMS ----

    def _auth(self, h):
        """The caller's role, or ApiError 401/400."""
        auth = h.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise ApiError(401, "UNAUTHORIZED_ERR", UNAUTHORIZED_MSG)
        token = auth[7:].strip()
        with self.lock:
            t = self.tokens.get(token)
            if t is None or t["expires"] <= time.time():
                raise ApiError(401, "UNAUTHORIZED_ERR", UNAUTHORIZED_MSG)
            role = self.apikeys.get(t["apikey"], "none")
        inst = h.headers.get("bluemix-instance")
        if not inst:
            raise ApiError(400, "BAD_REQUEST_ERR", "Bluemix-Instance header is required",
                           {"type": "header", "name": "bluemix-instance"})
        if inst != self.instance:
            raise ApiError(401, "UNAUTHORIZED_ERR", UNAUTHORIZED_MSG)
        if role == "none":
            raise ApiError(403, "FORBIDDEN_ERR", "The user does not have access to this resource")
        return role

    def _find(self, kid):
        k = self.keys.get(kid)
        if k is None:
            for cand in self.keys.values():
                if kid in getattr(cand, "aliases", []) and not cand.purged:
                    k = cand
        if k is None:
            for cand in self.keys.values():
                if cand.name == kid and not cand.purged:
                    k = cand
        if k is None or k.purged:
            raise ApiError(404, "KEY_NOT_FOUND_ERR", "Key does not exist")
        return k

    def _json_body(self, body, required=True):
        if not body:
            if required:
                raise ApiError(400, "BAD_BODY_ERR", "Invalid body data was passed: request body is empty")
            return {}
        try:
            doc = json.loads(body)
        except ValueError:
            raise ApiError(400, "BAD_BODY_ERR", "Invalid body data was passed: not JSON")
        if not isinstance(doc, dict):
            raise ApiError(400, "BAD_BODY_ERR", "Invalid body data was passed: not an object")
        return doc

    @staticmethod
    def _need(role, *allowed):
        if role not in allowed:
            raise ApiError(403, "FORBIDDEN_ERR", "The user does not have access to this action")

    def _kms(self, h, url, body):
        role = self._auth(h)
        parts = [p for p in url.path.split("/") if p]
        if parts[:3] != ["api", "v2", "keys"]:
            raise ApiError(404, "NOT_FOUND_ERR", "Resource does not exist")
        rest = parts[3:]
        query = urllib.parse.parse_qs(url.query)
        m = h.command
        with self.lock:
            if not rest:
                if m == "POST":
                    self._need(role, "manager", "writer")
                    return self._create(body)
                if m == "GET":
                    keys = [k.resource() for k in self.keys.values() if not k.purged]
                    return 200, collection(KEY_TYPE, keys), {}
                raise ApiError(405, "METHOD_NOT_ALLOWED_ERR", "method not allowed")
            kid = urllib.parse.unquote(rest[0])
            if len(rest) == 1:
                if m == "GET":
                    k = self._find(kid)
                    if k.deleted and self.deleted_metadata_status == 410:
                        raise ApiError(410, "KEY_DELETED_ERR", "The key has been deleted")
                    return 200, collection(KEY_TYPE, [k.resource()]), {}
                if m == "DELETE":
                    self._need(role, "manager")
                    k = self._find(kid)
                    self._delete(k)
                    self._save()
                    if "return=representation" in (h.headers.get("prefer") or ""):
                        return 200, collection(KEY_TYPE, [k.resource()]), {}
                    return 204, None, {}
                if m == "POST" and "action" in query:
                    return self._action(role, kid, query["action"][0], body)
                raise ApiError(405, "METHOD_NOT_ALLOWED_ERR", "method not allowed")
            if rest[1:] == ["metadata"] and m == "GET":
                k = self._find(kid)
                if k.deleted and self.deleted_metadata_status == 410:
                    raise ApiError(410, "KEY_DELETED_ERR", "The key has been deleted")
                return 200, collection(KEY_TYPE, [k.resource()]), {}
            if len(rest) == 3 and rest[1] == "actions" and m == "POST":
                return self._action(role, kid, rest[2], body)
            if len(rest) == 3 and rest[1] == "aliases" and m in ("POST", "DELETE"):
                self._need(role, "manager", "writer")
                alias = urllib.parse.unquote(rest[2])
                if m == "POST":
                    return 201, self._create_alias(self._find(kid), alias), {}
                self._delete_alias(self._find(kid), alias)
                return 204, None, {}
            if rest[1:] == ["restore"] and m == "POST":
                self._need(role, "manager")
                k = self._find(kid)
                self._restore(k)
                self._save()
                return 201, collection(KEY_TYPE, [k.resource()]), {}
            if rest[1:] == ["purge"] and m == "DELETE":
                self._need(role, "manager")
                k = self._find(kid)
                res = k.resource()
                self._purge(k)
                self._save()
                return 200, collection(KEY_TYPE, [res]), {}
            raise ApiError(404, "NOT_FOUND_ERR", "Resource does not exist")

    def _create(self, body):
        doc = self._json_body(body)
        res = doc.get("resources")
        if not isinstance(res, list) or len(res) != 1 or not isinstance(res[0], dict):
            raise ApiError(400, "BAD_BODY_ERR", "Invalid body data was passed: one resource expected")
        r = res[0]
        name = r.get("name")
        if not isinstance(name, str) or not (2 <= len(name) <= 90):
            raise ApiError(400, "INVALID_FIELD_ERR", "The field 'name' must be: 2 to 90 characters",
                           {"type": "field", "name": "name"})
        extractable = bool(r.get("extractable", False))
        k = Key(str(uuid.uuid4()), name, self.instance, extractable=extractable,
                description=r.get("description"))
        self.keys[k.id] = k
        self._save()
        return 201, collection(KEY_TYPE, [k.resource()]), {}

    # Aliases as the service has them: 2-90 characters of letters, digits, '-' and '_', not a
    # uuid, unique in the instance, at most 5 per key. There is no "move": delete, then create.
    def _create_alias(self, k, alias):
        if not re.fullmatch(r"[A-Za-z0-9_-]{2,90}", alias) or re.fullmatch(r"[0-9a-fA-F-]{36}", alias):
            raise ApiError(400, "INVALID_FIELD_ERR", "The field 'alias' must be: 2 to 90 letters, digits, '-' or '_'",
                           {"type": "field", "name": "alias"})
        for other in self.keys.values():
            if alias in getattr(other, "aliases", []) and not other.purged:
                if other is k:
                    break
                raise ApiError(409, "KEY_ALIAS_NOT_UNIQUE_ERR", "The alias is already used in this instance")
        else:
            if len(k.aliases) >= 5:
                raise ApiError(400, "KEY_ALIAS_QUOTA_ERR", "A key can have at most 5 aliases")
            k.aliases.append(alias)
            k.updated = time.time()
            self._save()
        return collection("application/vnd.ibm.kms.alias+json",
                          [{"keyId": k.id, "alias": alias, "creationDate": rfc3339(k.updated), "createdBy": "kpemu"}])

    def _delete_alias(self, k, alias):
        if alias not in k.aliases:
            raise ApiError(404, "ALIAS_NOT_FOUND_ERR", "Alias does not exist")
        k.aliases.remove(alias)
        k.updated = time.time()
        self._save()

    def create_alias(self, kid, alias):
        with self.lock:
            self._create_alias(self._find(kid), alias)

    def move_alias(self, alias, kid):
        """What an admin does to point an alias at another key: delete it from its key, create it on kid."""
        with self.lock:
            self._delete_alias(self._find(alias), alias)
            self._create_alias(self._find(kid), alias)

    def _usable(self, k, wrap):
        if k.state == 5 or k.deleted:
            raise ApiError(410, "KEY_DELETED_ERR", "The key has been deleted")
        ok = (1,) if wrap else (1, 3)
        if k.state not in ok:
            raise ApiError(409, "KEY_ACTION_INVALID_STATE_ERR",
                           "Key is not in a valid state for this action")

    def _aad(self, doc):
        aad = doc.get("aad", [])
        if not isinstance(aad, list) or not all(isinstance(s, str) and len(s) <= AAD_STRING_MAX for s in aad):
            raise ApiError(400, "INVALID_FIELD_ERR",
                           "The field 'aad' must be: an array of strings of at most 255 characters",
                           {"type": "field", "name": "aad"})
        return aad

    def _unseal(self, k, doc, aad):
        blob = doc.get("ciphertext")
        if not isinstance(blob, str) or not blob:
            raise ApiError(400, "INVALID_FIELD_ERR", "The field 'ciphertext' must be: a string",
                           {"type": "field", "name": "ciphertext"})
        handle, iv, sealed = parse_blob(blob)
        v = k.version(handle)
        if v is None:
            raise ApiError(422, "UNPROCESSABLE_CIPHERTEXT_ERR",
                           "The provided ciphertext was not made by this key")
        return v, open_sealed(v["secret"], iv, sealed, aad)

    def _action(self, role, kid, action, body):
        k = self._find(kid)
        if action in ("wrap", "unwrap", "rewrap"):
            self._need(role, "manager", "writer", "reader")
            if role == "reader" and action != "unwrap":
                raise ApiError(403, "FORBIDDEN_ERR", "The user does not have access to this action")
            doc = self._json_body(body, required=action != "wrap")
            aad = self._aad(doc)
            self._usable(k, wrap=action == "wrap")
            if k.extractable:
                raise ApiError(400, "INVALID_KEY_TYPE_ERR", "Standard keys cannot wrap or unwrap")
            if action == "wrap":
                if "plaintext" in doc:
                    try:
                        pt = b64d(doc["plaintext"])
                    except (ValueError, binascii.Error):
                        pt = b""
                    if not 1 <= len(pt) <= 7168:
                        raise ApiError(400, "INVALID_FIELD_ERR",
                                       "The field 'plaintext' must be: a base64 encoded key",
                                       {"type": "field", "name": "plaintext"})
                    generated = False
                else:
                    pt, generated = os.urandom(32), True
                v = k.latest
                self.deks.append(pt)
                out = {"ciphertext": seal(v["secret"], v["id"], pt, aad), "keyVersion": {"id": v["id"]}}
                if generated:
                    out["plaintext"] = b64e(pt)
                return 200, out, {}
            v, pt = self._unseal(k, doc, aad)
            self.deks.append(pt)
            latest = k.latest
            if action == "unwrap":
                out = {"plaintext": b64e(pt), "keyVersion": {"id": v["id"]}}
                if v["id"] != latest["id"]:
                    out["ciphertext"] = seal(latest["secret"], latest["id"], pt, aad)
                    out["rewrappedKeyVersion"] = {"id": latest["id"]}
                return 200, out, {}
            return 200, {"ciphertext": seal(latest["secret"], latest["id"], pt, aad),
                         "keyVersion": {"id": v["id"]}, "rewrappedKeyVersion": {"id": latest["id"]}}, {}
        self._need(role, "manager")
        if action == "rotate":
            self._rotate(k)
        elif action in ("disable", "enable"):
            self._enable_disable(k, action)
        else:
            raise ApiError(400, "INVALID_QUERY_PARAM_ERR",
                           "The query parameter 'action' must be: one of wrap, unwrap, rewrap, rotate, "
                           "disable, enable")
        self._save()
        return 204, None, {}

    def _too_early(self, k):
        if self.enforce_too_early and time.time() - k.last_action < self.too_early_seconds:
            raise ApiError(409, "REQ_TOO_EARLY_ERR",
                           "The key was updated recently: wait %d seconds between actions"
                           % self.too_early_seconds)

    def _rotate(self, k):
        if k.state != 1:
            raise ApiError(409, "KEY_ACTION_INVALID_STATE_ERR", "Key is not in a valid state for this action")
        if self.enforce_rotation_limit and time.time() - k.rotated < 3600:
            raise ApiError(409, "KEY_ROTATION_NOT_PERMITTED", "The key was rotated within the last hour")
        k.add_version()
        k.rotated = k.updated = time.time()

    def _enable_disable(self, k, action):
        if k.deleted:
            raise ApiError(410, "KEY_DELETED_ERR", "The key has been deleted")
        if action == "disable":
            if k.state != 1:
                raise ApiError(409, "KEY_ACTION_INVALID_STATE_ERR", "Key is not in a valid state for this action")
            k.state = 2
        else:
            if k.state != 2:
                raise ApiError(409, "KEY_ACTION_INVALID_STATE_ERR", "Key is not in a valid state for this action")
            self._too_early(k)
            k.state = 1
        k.last_action = k.updated = time.time()

    def _delete(self, k):
        if k.deleted:
            raise ApiError(410, "KEY_DELETED_ERR", "The key has been deleted")
        k.state, k.deleted = 5, True
        k.deletion_date = k.last_action = k.updated = time.time()

    def _restore(self, k):
        if not k.deleted:
            raise ApiError(409, "KEY_ACTION_INVALID_STATE_ERR", "Only a deleted key can be restored")
        self._too_early(k)
        k.state, k.deleted, k.deletion_date = 1, False, None
        k.last_action = k.updated = time.time()

    def _purge(self, k):
        if not k.deleted:
            raise ApiError(409, "KEY_ACTION_INVALID_STATE_ERR", "Only a deleted key can be purged")
        k.purged = True

    # ---- control API ----

    def _control(self, h, method, path, body):
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            return self._send_json(h, 400, {"error": "body is not JSON"})
        try:
            with self.lock:
                if path == "/_emu/log" and method == "GET":
                    return self._send_json(h, 200, self.log)
                if path == "/_emu/stats" and method == "GET":
                    return self._send_json(h, 200, {"connections": self.connections, "resets": self.resets,
                                                    "requests": len(self.log),
                                                    "token_requests": len(self.token_requests()),
                                                    "kms_calls": dict(self.call_counts),
                                                    "rate_limited": self.rate_limited})
                if path == "/_emu/stats" and method == "DELETE":
                    self.call_counts = {}
                    self.rate_limited = 0
                    return self._send_json(h, 204, None)
                if path == "/_emu/ratelimit" and method == "POST":
                    self.set_rate_limit(doc.get("per_second"), doc.get("burst"), doc.get("retry_after", 1))
                    return self._send_json(h, 200, {k: v for k, v in (self.rate or {}).items()
                                                    if k in ("per_second", "burst", "retry_after")})
                if path == "/_emu/log" and method == "POST":
                    self.quiet_log = not bool(doc.get("keep", True))
                    return self._send_json(h, 200, {"keep": not self.quiet_log})
                if path == "/_emu/log" and method == "DELETE":
                    self.log = []
                    return self._send_json(h, 204, None)
                if path == "/_emu/faults" and method == "GET":
                    return self._send_json(h, 200, [f.to_json() for f in self.faults])
                if path == "/_emu/faults" and method == "POST":
                    items = doc.get("faults", [doc]) if isinstance(doc, dict) else doc
                    for item in items:
                        self.add_fault(**item)
                    return self._send_json(h, 200, [f.to_json() for f in self.faults])
                if path == "/_emu/faults" and method == "DELETE":
                    self.clear_faults()
                    return self._send_json(h, 204, None)
                if path == "/_emu/latency" and method == "POST":
                    self.set_latency(doc.get("ms", 0), doc.get("match", "kms"))
                    return self._send_json(h, 200, self.latency)
                if path == "/_emu/expire-tokens" and method == "POST":
                    self.expire_tokens()
                    return self._send_json(h, 204, None)
                if path == "/_emu/keys" and method == "POST":
                    kid = self.create_key(doc.get("name", "keyfs-root"))
                    return self._send_json(h, 201, self.keys[kid].resource())
                if path == "/_emu/keys" and method == "GET":
                    return self._send_json(h, 200, [k.resource() for k in self.keys.values() if not k.purged])
                parts = path.split("/")
                if len(parts) == 6 and parts[2] == "keys" and parts[4] == "aliases" and method in ("POST", "DELETE"):
                    if method == "DELETE":
                        self._delete_alias(self._find(parts[3]), parts[5])
                    elif doc.get("move"):
                        self._delete_alias(self._find(parts[5]), parts[5])
                        self._create_alias(self._find(parts[3]), parts[5])
                    else:
                        self._create_alias(self._find(parts[3]), parts[5])
                    return self._send_json(h, 200, self.keys[self._find(parts[3]).id].resource())
                if len(parts) == 5 and parts[2] == "keys" and method == "POST":
                    self.key_action(parts[3], parts[4])
                    return self._send_json(h, 200, self.keys[parts[3]].resource())
        except (TypeError, ValueError) as e:
            return self._send_json(h, 400, {"error": str(e)})
        except ApiError as e:
            return self._send_json(h, e.status, error_body(e.status, e.code, e.message))
        return self._send_json(h, 404, {"error": "no such control endpoint"})
