#!/usr/bin/env python3
"""Readiness probes and a tiny CQL client for scripts/dev-services.

Standard library only (socket, struct, ssl, hashlib/hmac for SCRAM): no Kafka
or Cassandra client has to be installed for `scripts/dev-services up` to know
that a service is really serving, not just that its port is open, and, for
the secure services, that TLS and the credentials are accepted.

  probe.py [OPTS] kafka HOST PORT [TIMEOUT]   ApiVersions, then a Metadata request;
                                       ready when the broker lists itself. With
                                       --user: SaslHandshake + SaslAuthenticate
                                       (--sasl SCRAM-SHA-512 (default),
                                       SCRAM-SHA-256 or PLAIN) before Metadata.
  probe.py [OPTS] cql HOST PORT [TIMEOUT]     CQL native protocol v4: STARTUP -> READY
                                       (or AUTHENTICATE -> AUTH_RESPONSE with
                                       --user), then SELECT release_version FROM
                                       system.local.
  probe.py [OPTS] cql-exec HOST PORT STMT...  runs each statement on one connection
                                       (so USE carries over) and prints results.
  probe.py [OPTS] cql-ensure-role HOST PORT ROLE ROLE_PASSWORD_FILE [TIMEOUT]
                                       ready when ROLE can log in with that
                                       password; if it cannot, logs in as the
                                       --user of OPTS (an existing superuser),
                                       creates or alters ROLE (LOGIN, SUPERUSER,
                                       that password) and checks again.

OPTS:
  --ca FILE             TLS, verifying the server's certificate against the CA
                        in FILE and its name against HOST (an IP SAN for an IP).
  --user NAME           authenticate as NAME (Kafka SASL, CQL PasswordAuthenticator;
                        a CQL server that does not ask for it is an error then).
  --password-file FILE  NAME's password: the first line of FILE.
  --password PASSWORD   the same on the command line (tests only: ps shows it).
  --sasl MECHANISM      Kafka only: SCRAM-SHA-512 (default), SCRAM-SHA-256, PLAIN.

Exit status: 0 ready / statements ran, 1 not ready / a statement failed,
2 usage error, 4 the server refused the credentials. On failure the reason is
printed on stderr.
"""

import base64
import datetime
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import struct
import sys
import time
import uuid


class ProbeError(Exception):
    pass


class AuthError(ProbeError):
    """The server refused the credentials (wrong user or password)."""


def connect(host, port, timeout, tls):
    """A TCP connection, wrapped in TLS (verifying the server) when tls is an SSLContext."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(timeout)
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def tls_context(cafile):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError("connection closed by peer")
        buf += chunk
    return bytes(buf)


class Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, fmt):
        vals = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals[0] if len(vals) == 1 else vals

    def raw(self, n):
        if self.pos + n > len(self.data):
            raise ProbeError("truncated response")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def short_string(self):
        n = self.take(">h")
        return None if n < 0 else self.raw(n).decode("utf-8", "replace")

    def long_string(self):
        n = self.take(">i")
        return None if n < 0 else self.raw(n).decode("utf-8", "replace")

    def bytes_(self):
        n = self.take(">i")
        return None if n < 0 else self.raw(n)


# --------------------------------------------------------------------------- Kafka

KAFKA_API_METADATA = 3
KAFKA_API_SASL_HANDSHAKE = 17
KAFKA_API_VERSIONS = 18
KAFKA_API_SASL_AUTHENTICATE = 36
KAFKA_SASL_AUTHENTICATION_FAILED = 58
CLIENT_ID = b"waymark-dev-services-probe"


def kafka_call(sock, api_key, api_version, correlation_id, body):
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(CLIENT_ID)) + CLIENT_ID
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    size = struct.unpack(">i", recv_exact(sock, 4))[0]
    data = recv_exact(sock, size)
    if struct.unpack_from(">i", data, 0)[0] != correlation_id:
        raise ProbeError("correlation id mismatch")
    return Reader(data[4:])


def kafka_string(s):
    b = s.encode("utf-8")
    return struct.pack(">h", len(b)) + b


def kafka_bytes(b):
    return struct.pack(">i", len(b)) + b


def pick_version(versions, api_key, name, wanted):
    """The highest of the (non-flexible) versions in wanted that the broker offers."""
    if api_key not in versions:
        raise ProbeError("broker does not offer the %s API" % name)
    lo, hi = versions[api_key]
    ok = [v for v in wanted if lo <= v <= hi]
    if not ok:
        raise ProbeError("no %s version in %s (broker offers %d..%d)" % (name, wanted, lo, hi))
    return max(ok)


def scram(authenticate, mechanism, user, password):
    """RFC 5802 client side; authenticate(bytes) -> bytes is one SaslAuthenticate round trip."""
    algo = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}[mechanism]
    cnonce = base64.b64encode(os.urandom(24)).decode()
    bare = "n=%s,r=%s" % (user.replace("=", "=3D").replace(",", "=2C"), cnonce)
    server_first = authenticate(("n,," + bare).encode()).decode("utf-8", "replace")
    attrs = dict(kv.split("=", 1) for kv in server_first.split(",") if "=" in kv)
    if "e" in attrs:
        raise AuthError("SCRAM error: %s" % attrs["e"])
    nonce = attrs.get("r", "")
    if not nonce.startswith(cnonce) or "s" not in attrs or "i" not in attrs:
        raise ProbeError("malformed SCRAM server-first-message %r" % server_first)
    salted = hashlib.pbkdf2_hmac(algo, password.encode("utf-8"), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", algo).digest()
    stored_key = hashlib.new(algo, client_key).digest()
    without_proof = "c=biws,r=" + nonce  # biws = base64("n,,"): no channel binding
    auth_message = ",".join([bare, server_first, without_proof]).encode()
    signature = hmac.new(stored_key, auth_message, algo).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    server_final = authenticate((without_proof + ",p=" + base64.b64encode(proof).decode()).encode()).decode("utf-8", "replace")
    server_key = hmac.new(salted, b"Server Key", algo).digest()
    expected = "v=" + base64.b64encode(hmac.new(server_key, auth_message, algo).digest()).decode()
    if server_final.startswith("e="):
        raise AuthError("SCRAM error: %s" % server_final[2:])
    if server_final != expected:
        raise ProbeError("the broker's SCRAM server signature does not match (not the password it stores?)")


def kafka_sasl(sock, versions, mechanism, user, password):
    """SaslHandshake v1, then SaslAuthenticate rounds (KIP-152 framing)."""
    hv = pick_version(versions, KAFKA_API_SASL_HANDSHAKE, "SaslHandshake", [1])
    r = kafka_call(sock, KAFKA_API_SASL_HANDSHAKE, hv, 3, kafka_string(mechanism))
    error = r.take(">h")
    offered = [r.short_string() for _ in range(r.take(">i"))]
    if error != 0:
        raise ProbeError("SaslHandshake for %s: error code %d (the listener offers %s)" % (mechanism, error, ",".join(offered)))
    av = pick_version(versions, KAFKA_API_SASL_AUTHENTICATE, "SaslAuthenticate", [0, 1])
    correlation = [10]

    def authenticate(token):
        correlation[0] += 1
        r = kafka_call(sock, KAFKA_API_SASL_AUTHENTICATE, av, correlation[0], kafka_bytes(token))
        error = r.take(">h")
        message = r.short_string()
        data = r.bytes_() or b""
        if error == KAFKA_SASL_AUTHENTICATION_FAILED:
            raise AuthError("%s authentication as %s refused: %s" % (mechanism, user, message))
        if error != 0:
            raise ProbeError("SaslAuthenticate error code %d: %s" % (error, message))
        return data

    if mechanism == "PLAIN":
        authenticate(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))
    elif mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
        scram(authenticate, mechanism, user, password)
    else:
        raise ProbeError("unsupported SASL mechanism %s (SCRAM-SHA-512, SCRAM-SHA-256, PLAIN)" % mechanism)


def kafka_probe(host, port, timeout, tls=None, user=None, password=None, mechanism=None):
    with connect(host, port, timeout, tls) as sock:
        # ApiVersions v0 is answered by every broker version, whatever it supports
        # (and by a SASL listener before authentication).
        r = kafka_call(sock, KAFKA_API_VERSIONS, 0, 1, b"")
        error = r.take(">h")
        if error != 0:
            raise ProbeError("ApiVersions error code %d" % error)
        versions = {}
        for _ in range(r.take(">i")):
            key, lo, hi = r.take(">hhh")
            versions[key] = (lo, hi)
        auth = ""
        if user is not None:
            mechanism = mechanism or "SCRAM-SHA-512"
            kafka_sasl(sock, versions, mechanism, user, password)
            auth = " sasl=%s:%s" % (mechanism, user)
        if tls is not None:
            auth = " %s%s" % (sock.version(), auth)
        # v4..v8 share the same (non-flexible) layout of the part we read.
        version = pick_version(versions, KAFKA_API_METADATA, "Metadata", [4, 5, 6, 7, 8])
        body = struct.pack(">i", 0)  # no topics: only brokers, cluster id, controller
        body += struct.pack(">b", 0)  # allow_auto_topic_creation
        if version >= 8:
            body += struct.pack(">bb", 0, 0)  # include cluster/topic authorized operations
        r = kafka_call(sock, KAFKA_API_METADATA, version, 2, body)
        r.take(">i")  # throttle_time_ms
        brokers = []
        for _ in range(r.take(">i")):
            node_id = r.take(">i")
            bhost = r.short_string()
            bport = r.take(">i")
            r.short_string()  # rack
            brokers.append("%d@%s:%d" % (node_id, bhost, bport))
        cluster_id = r.short_string()
        controller_id = r.take(">i")
        if not brokers:
            raise ProbeError("metadata lists no broker yet")
        return "cluster_id=%s brokers=[%s] controller_id=%d%s" % (cluster_id, ",".join(brokers), controller_id, auth)


# ----------------------------------------------------------------------------- CQL

CQL_VERSION = 0x04  # protocol v4: plain framing (v5 adds checksummed segments)
OP_ERROR, OP_STARTUP, OP_READY, OP_AUTHENTICATE, OP_QUERY, OP_RESULT = 0x00, 0x01, 0x02, 0x03, 0x07, 0x08
OP_AUTH_CHALLENGE, OP_AUTH_RESPONSE, OP_AUTH_SUCCESS = 0x0E, 0x0F, 0x10
CQL_BAD_CREDENTIALS = 0x0100
CONSISTENCY_ONE = 0x0001


def cql_string(s):
    b = s.encode("utf-8")
    return struct.pack(">H", len(b)) + b


class CqlConnection:
    def __init__(self, host, port, timeout, tls=None, user=None, password=None):
        self.sock = connect(host, port, timeout, tls)
        self.stream = 0
        try:
            self._handshake(user, password)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, user, password):
        opcode, r = self.call(OP_STARTUP, struct.pack(">H", 1) + cql_string("CQL_VERSION") + cql_string("3.0.0"))
        if opcode == OP_AUTHENTICATE:
            authenticator = r.short_string()
            if user is None:
                raise ProbeError("server requires authentication (%s): pass --user and --password-file" % authenticator)
            # SASL PLAIN, as PasswordAuthenticator expects: authzid (empty) NUL user NUL password.
            token = b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8")
            opcode, r = self.call(OP_AUTH_RESPONSE, struct.pack(">i", len(token)) + token)
            if opcode == OP_AUTH_CHALLENGE:
                raise ProbeError("authenticator %s sent a challenge; only PasswordAuthenticator is supported" % authenticator)
            if opcode != OP_AUTH_SUCCESS:
                raise ProbeError("unexpected answer to AUTH_RESPONSE: opcode 0x%02x" % opcode)
        elif opcode == OP_READY:
            if user is not None:
                raise ProbeError("server does not require authentication (expected a PasswordAuthenticator)")
        else:
            raise ProbeError("unexpected answer to STARTUP: opcode 0x%02x" % opcode)

    def close(self):
        self.sock.close()

    def call(self, opcode, body):
        self.stream = (self.stream + 1) % 32768
        self.sock.sendall(struct.pack(">BBhBi", CQL_VERSION, 0, self.stream, opcode, len(body)) + body)
        version, flags, stream, resp_op, length = struct.unpack(">BBhBi", recv_exact(self.sock, 9))
        data = recv_exact(self.sock, length)
        if version & 0x7F != CQL_VERSION:
            raise ProbeError("server answered with protocol version %d" % (version & 0x7F))
        r = Reader(data)
        if flags & 0x02:  # tracing id
            r.raw(16)
        if flags & 0x08:  # warnings
            for _ in range(r.take(">H")):
                print("warning: %s" % r.short_string(), file=sys.stderr)
        if flags & 0x04:  # custom payload
            for _ in range(r.take(">H")):
                r.short_string()
                r.bytes_()
        if resp_op == OP_ERROR:
            code = r.take(">i")
            cls = AuthError if code == CQL_BAD_CREDENTIALS else ProbeError
            raise cls("server error 0x%04x: %s" % (code, r.short_string()))
        return resp_op, r

    def query(self, statement):
        body = struct.pack(">i", len(statement.encode("utf-8"))) + statement.encode("utf-8")
        body += struct.pack(">HB", CONSISTENCY_ONE, 0)
        opcode, r = self.call(OP_QUERY, body)
        if opcode != OP_RESULT:
            raise ProbeError("unexpected answer to QUERY: opcode 0x%02x" % opcode)
        return decode_result(r)


def read_type(r):
    tid = r.take(">H")
    if tid == 0x0000:
        return ("custom", r.short_string())
    if tid in (0x0020, 0x0022):
        return (tid, read_type(r))
    if tid == 0x0021:
        return (tid, read_type(r), read_type(r))
    if tid == 0x0030:
        r.short_string()
        r.short_string()
        return (tid, [(r.short_string(), read_type(r)) for _ in range(r.take(">H"))])
    if tid == 0x0031:
        return (tid, [read_type(r) for _ in range(r.take(">H"))])
    return (tid,)


def decode_value(ctype, raw):
    if raw is None:
        return "null"
    tid = ctype[0]
    if tid in (0x0001, 0x000D):  # ascii, varchar
        return raw.decode("utf-8", "replace")
    if tid == 0x0009:
        return str(struct.unpack(">i", raw)[0])
    if tid in (0x0002, 0x0005):  # bigint, counter
        return str(struct.unpack(">q", raw)[0])
    if tid == 0x0013:
        return str(struct.unpack(">h", raw)[0])
    if tid == 0x0014:
        return str(struct.unpack(">b", raw)[0])
    if tid == 0x0004:
        return "true" if raw != b"\x00" else "false"
    if tid == 0x0007:
        return repr(struct.unpack(">d", raw)[0])
    if tid == 0x0008:
        return repr(struct.unpack(">f", raw)[0])
    if tid in (0x000C, 0x000F):  # uuid, timeuuid
        return str(uuid.UUID(bytes=raw))
    if tid == 0x000B:  # timestamp: ms since the epoch
        ms = struct.unpack(">q", raw)[0]
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (epoch + datetime.timedelta(milliseconds=ms)).isoformat()
    if tid == 0x0010:
        return str(ipaddress.ip_address(raw))
    if tid in (0x0020, 0x0022, 0x0021):  # list, set, map (v4: int32 counts)
        r = Reader(raw)
        n = r.take(">i")
        if tid == 0x0021:
            items = ["%s: %s" % (decode_value(ctype[1], r.bytes_()), decode_value(ctype[2], r.bytes_())) for _ in range(n)]
            return "{" + ", ".join(items) + "}"
        items = [decode_value(ctype[1], r.bytes_()) for _ in range(n)]
        return ("[%s]" if tid == 0x0020 else "{%s}") % ", ".join(items)
    return "0x" + raw.hex()


def decode_result(r):
    kind = r.take(">i")
    if kind == 1:
        return {"kind": "void"}
    if kind == 3:
        return {"kind": "set_keyspace", "keyspace": r.short_string()}
    if kind == 5:
        change, target = r.short_string(), r.short_string()
        name = r.short_string()
        if target != "KEYSPACE":
            name += "." + r.short_string()
        return {"kind": "schema_change", "text": "%s %s %s" % (change, target, name)}
    if kind != 2:
        return {"kind": "other(%d)" % kind}
    flags = r.take(">i")
    ncols = r.take(">i")
    if flags & 0x0002:
        r.bytes_()  # paging state
    columns = []
    if not flags & 0x0004:
        global_spec = flags & 0x0001
        if global_spec:
            r.short_string()
            r.short_string()
        for _ in range(ncols):
            if not global_spec:
                r.short_string()
                r.short_string()
            columns.append((r.short_string(), read_type(r)))
    rows = []
    for _ in range(r.take(">i")):
        row = []
        for i in range(ncols):
            raw = r.bytes_()
            ctype = columns[i][1] if columns else (0xFFFF,)
            row.append(decode_value(ctype, raw))
        rows.append(row)
    return {"kind": "rows", "columns": [c[0] for c in columns], "rows": rows}


def cql_probe(host, port, timeout, tls=None, user=None, password=None):
    conn = CqlConnection(host, port, timeout, tls, user, password)
    try:
        res = conn.query("SELECT release_version FROM system.local")
        proto = conn.sock.version() if tls is not None else None
    finally:
        conn.close()
    if res["kind"] != "rows" or not res["rows"]:
        raise ProbeError("system.local returned no row")
    extra = ""
    if proto:
        extra += " " + proto
    if user is not None:
        extra += " user=" + user
    return "release_version=%s%s" % (res["rows"][0][0], extra)


def cql_ensure_role(host, port, timeout, tls, admin, admin_password, role, role_password):
    try:
        return cql_probe(host, port, timeout, tls, role, role_password)
    except AuthError:
        pass
    conn = CqlConnection(host, port, timeout, tls, admin, admin_password)
    try:
        name = '"%s"' % role.replace('"', '""')
        options = "PASSWORD = '%s' AND LOGIN = true AND SUPERUSER = true" % role_password.replace("'", "''")
        found = conn.query("SELECT role FROM system_auth.roles WHERE role = '%s'" % role.replace("'", "''"))
        # ALTER when it exists with another password (a password file deleted
        # by hand). Not CREATE then ALTER: Cassandra 5 refuses a second
        # password change of a role within 5 s.
        verb = "ALTER" if found.get("rows") else "CREATE"
        conn.query("%s ROLE %s WITH %s" % (verb, name, options))
    finally:
        conn.close()
    # PasswordAuthenticator caches credentials (credentials_validity, 2 s by
    # default): a changed password may be refused for that long.
    deadline = time.monotonic() + max(timeout, 5.0)
    while True:
        try:
            answer = cql_probe(host, port, timeout, tls, role, role_password)
            break
        except AuthError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
    return answer + " (role %s: %s by %s)" % (role, "created" if verb == "CREATE" else "password set", admin)


def cql_exec(host, port, statements, tls=None, user=None, password=None):
    conn = CqlConnection(host, port, 60, tls, user, password)
    try:
        for stmt in statements:
            res = conn.query(stmt)
            if res["kind"] == "rows":
                print(" | ".join(res["columns"]))
                for row in res["rows"]:
                    print(" | ".join(row))
                print("(%d rows)" % len(res["rows"]))
            elif res["kind"] == "schema_change":
                print("OK: " + res["text"])
            elif res["kind"] == "set_keyspace":
                print("OK: using keyspace " + res["keyspace"])
            else:
                print("OK")
    finally:
        conn.close()


def read_password(path):
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


class Usage(Exception):
    pass


def main(argv):
    opts = {"ca": None, "user": None, "password": None, "sasl": None}
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        while argv and argv[0].startswith("--"):
            if len(argv) < 2:
                raise Usage("%s needs a value" % argv[0])
            opt, val, argv = argv[0], argv[1], argv[2:]
            if opt == "--ca":
                opts["ca"] = val
            elif opt == "--user":
                opts["user"] = val
            elif opt == "--password-file":
                opts["password"] = read_password(val)
            elif opt == "--password":
                opts["password"] = val
            elif opt == "--sasl":
                opts["sasl"] = val
            else:
                raise Usage("unknown option %s" % opt)
        if len(argv) < 3 or argv[0] not in ("kafka", "cql", "cql-exec", "cql-ensure-role"):
            raise Usage(None)
        if opts["user"] is not None and opts["password"] is None:
            raise Usage("--user needs --password-file (or --password)")
        mode, host, port = argv[0], argv[1], int(argv[2])
    except (Usage, ValueError) as e:
        if isinstance(e, Usage) and e.args[0]:
            print("probe.py: %s" % e.args[0], file=sys.stderr)
        print(__doc__, file=sys.stderr)
        return 2
    except OSError as e:
        print("probe.py: %s" % e, file=sys.stderr)
        return 2
    auth = (opts["user"], opts["password"])
    try:
        tls = tls_context(opts["ca"]) if opts["ca"] else None
        if mode == "cql-exec":
            if len(argv) < 4:
                print("cql-exec needs at least one statement", file=sys.stderr)
                return 2
            cql_exec(host, port, argv[3:], tls, *auth)
            return 0
        if mode == "cql-ensure-role":
            if len(argv) < 5 or opts["user"] is None:
                print("cql-ensure-role needs --user/--password(-file) of a superuser, ROLE and ROLE_PASSWORD_FILE", file=sys.stderr)
                return 2
            timeout = float(argv[5]) if len(argv) > 5 else 5.0
            print(cql_ensure_role(host, port, timeout, tls, opts["user"], opts["password"], argv[3], read_password(argv[4])))
            return 0
        timeout = float(argv[3]) if len(argv) > 3 else 5.0
        if mode == "kafka":
            print(kafka_probe(host, port, timeout, tls, opts["user"], opts["password"], opts["sasl"]))
        else:
            print(cql_probe(host, port, timeout, tls, *auth))
        return 0
    except AuthError as e:
        print("%s:%d: %s" % (host, port, e), file=sys.stderr)
        return 4
    except (OSError, ProbeError, struct.error) as e:
        print("%s:%d: %s" % (host, port, e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
