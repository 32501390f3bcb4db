#!/usr/bin/env python3
"""Readiness probes and a tiny CQL client for scripts/dev-services.

Standard library only (socket + struct): no Kafka or Cassandra client has to
be installed for `scripts/dev-services up` to know that a service is really
serving, not just that its port is open.

  probe.py kafka HOST PORT [TIMEOUT]   ApiVersions, then a Metadata request;
                                       ready when the broker lists itself.
  probe.py cql HOST PORT [TIMEOUT]     CQL native protocol v4: STARTUP -> READY,
                                       then SELECT release_version FROM system.local.
  probe.py cql-exec HOST PORT STMT...  runs each statement on one connection
                                       (so USE carries over) and prints results.

Exit status: 0 ready / statements ran, 1 not ready / a statement failed,
2 usage error. On failure the reason is printed on stderr.
"""

import datetime
import ipaddress
import socket
import struct
import sys
import uuid


class ProbeError(Exception):
    pass


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
KAFKA_API_VERSIONS = 18
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


def kafka_probe(host, port, timeout):
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        # ApiVersions v0 is answered by every broker version, whatever it supports.
        r = kafka_call(sock, KAFKA_API_VERSIONS, 0, 1, b"")
        error = r.take(">h")
        if error != 0:
            raise ProbeError("ApiVersions error code %d" % error)
        versions = {}
        for _ in range(r.take(">i")):
            key, lo, hi = r.take(">hhh")
            versions[key] = (lo, hi)
        if KAFKA_API_METADATA not in versions:
            raise ProbeError("broker does not offer the Metadata API")
        lo, hi = versions[KAFKA_API_METADATA]
        # v4..v8 share the same (non-flexible) layout of the part we read.
        version = max(lo, 4)
        if version > min(hi, 8):
            raise ProbeError("no Metadata version in 4..8 (broker offers %d..%d)" % (lo, hi))
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
        return "cluster_id=%s brokers=[%s] controller_id=%d" % (cluster_id, ",".join(brokers), controller_id)


# ----------------------------------------------------------------------------- CQL

CQL_VERSION = 0x04  # protocol v4: plain framing (v5 adds checksummed segments)
OP_ERROR, OP_STARTUP, OP_READY, OP_AUTHENTICATE, OP_QUERY, OP_RESULT = 0x00, 0x01, 0x02, 0x03, 0x07, 0x08
CONSISTENCY_ONE = 0x0001


def cql_string(s):
    b = s.encode("utf-8")
    return struct.pack(">H", len(b)) + b


class CqlConnection:
    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.stream = 0
        opcode, r = self.call(OP_STARTUP, struct.pack(">H", 1) + cql_string("CQL_VERSION") + cql_string("3.0.0"))
        if opcode == OP_AUTHENTICATE:
            raise ProbeError("server requires authentication (%s); dev-services runs without it" % r.short_string())
        if opcode != OP_READY:
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
            raise ProbeError("server error 0x%04x: %s" % (code, r.short_string()))
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


def cql_probe(host, port, timeout):
    conn = CqlConnection(host, port, timeout)
    try:
        res = conn.query("SELECT release_version FROM system.local")
    finally:
        conn.close()
    if res["kind"] != "rows" or not res["rows"]:
        raise ProbeError("system.local returned no row")
    return "release_version=%s" % res["rows"][0][0]


def cql_exec(host, port, statements):
    conn = CqlConnection(host, port, 60)
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


def main(argv):
    if len(argv) < 3 or argv[0] not in ("kafka", "cql", "cql-exec"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, host, port = argv[0], argv[1], int(argv[2])
    try:
        if mode == "cql-exec":
            if len(argv) < 4:
                print("cql-exec needs at least one statement", file=sys.stderr)
                return 2
            cql_exec(host, port, argv[3:])
            return 0
        timeout = float(argv[3]) if len(argv) > 3 else 5.0
        probe = kafka_probe if mode == "kafka" else cql_probe
        print(probe(host, port, timeout))
        return 0
    except (OSError, ProbeError, struct.error) as e:
        print("%s:%d: %s" % (host, port, e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
