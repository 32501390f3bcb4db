#!/usr/bin/env python3
"""A kafka-python (pure-Python Kafka client) driver for Waymark's tests.

It lets the integration tests talk to a Kafka endpoint (real Apache Kafka or
`waymark dev`) through a third-party client that does not share code with
librdkafka or the Java client. The broker version is never configured: the
clients are built with api_version=None, so kafka-python negotiates every
request version from the broker's ApiVersions answer.

    produce --bootstrap B --topic T --count N --key-prefix K
        N valid `interaction.recorded` events (contract section 2) for the
        person key `python:K`, ids `K-0` .. `K-(N-1)`, acks=all, flushed;
        prints `PRODUCED N`.
    consume --bootstrap B --topic T --group G --count N --timeout S
        a consumer-group member that commits synchronously what it consumed;
        prints `CONSUMED N` once it has N records (exit 3 on timeout).
    headers --bootstrap B --topic T
        produces one record with two headers of the same name (different
        values) and one header with a null value, reads it back with a plain
        (group-less) consumer from the beginning, prints the headers as JSON;
        exit 0 only if they round-tripped exactly, in order.

Exit codes: 0 ok, 1 error (message on stderr), 2 bad arguments, 3 timeout.
Run with the venv of `scripts/test-clients ensure` ($WAYMARK_TEST_PYTHON).
"""

import argparse
import datetime
import json
import logging
import sys
import time
import uuid

PROG = "kafka_python_client"
CLIENT_ID = "waymark-test-kafka-python"

try:
    import kafka
    import kafka.errors
    from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
except ImportError as e:  # a clear message instead of a traceback
    sys.stderr.write(f"{PROG}: error: kafka-python is not importable ({e}); "
                     "run `scripts/test-clients ensure` and use $WAYMARK_TEST_PYTHON\n")
    sys.exit(1)


class Failure(Exception):
    """An expected failure: printed as one line, exit code attached."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(event_id, platform_id, content):
    """One valid Waymark event (contract sections 2 and 3) as compact JSON bytes."""
    return json.dumps({
        "id": event_id,
        "type": "interaction.recorded",
        "version": 1,
        "time": now_rfc3339(),
        "source": {"platform": "python", "platform_id": platform_id},
        "data": {"kind": "message", "content_type": "text", "content": content},
    }, separators=(",", ":")).encode("utf-8")


def check_prefix(prefix, count):
    # platform_id: 1..256 chars without control characters; id: 1..128 chars.
    if not prefix or len(prefix) > 256 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in prefix):
        raise Failure(f"--key-prefix must be 1..256 characters without control characters, got {prefix!r}", 2)
    if len(f"{prefix}-{max(count - 1, 0)}") > 128:
        raise Failure("--key-prefix is too long: event ids `<prefix>-<i>` must be at most 128 characters", 2)


# ---------------------------------------------------------------------- produce

def cmd_produce(a):
    if a.count < 0:
        raise Failure("--count must be >= 0", 2)
    check_prefix(a.key_prefix, a.count)
    producer = KafkaProducer(
        bootstrap_servers=a.bootstrap,
        client_id=CLIENT_ID,
        api_version=None,                # negotiate through ApiVersions
        acks="all",
        enable_idempotence=not a.no_idempotence,
        retries=5,
        linger_ms=5,
        bootstrap_timeout_ms=a.timeout * 1000,
        max_block_ms=a.timeout * 1000,
        request_timeout_ms=min(a.timeout * 1000, 30000),
    )
    try:
        key = f"python:{a.key_prefix}".encode("utf-8")
        futures = [producer.send(a.topic, key=key,
                                 value=envelope(f"{a.key_prefix}-{i}", a.key_prefix, f"kafka-python {i}"))
                   for i in range(a.count)]
        producer.flush(timeout=a.timeout)
        for i, f in enumerate(futures):
            try:
                f.get(timeout=a.timeout)  # raises the record's own error, if any
            except kafka.errors.KafkaError as e:
                raise Failure(f"record {i} ({a.key_prefix}-{i}) was not acknowledged: {e!r}")
    finally:
        producer.close(timeout=a.timeout)
    print(f"PRODUCED {a.count}", flush=True)


# ---------------------------------------------------------------------- consume

def cmd_consume(a):
    if a.count < 1:
        raise Failure("--count must be >= 1", 2)
    consumer = KafkaConsumer(
        a.topic,
        bootstrap_servers=a.bootstrap,
        client_id=CLIENT_ID,
        group_id=a.group,
        api_version=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,        # committed synchronously below
        session_timeout_ms=10000,
        heartbeat_interval_ms=1000,
        bootstrap_timeout_ms=a.timeout * 1000,
    )
    got = 0
    deadline = time.monotonic() + a.timeout
    try:
        while got < a.count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"timed out after {a.timeout}s with {got} of {a.count} records", 3)
            batches = consumer.poll(timeout_ms=int(min(left, 1.0) * 1000), max_records=a.count - got)
            offsets = {}
            for tp, records in sorted(batches.items()):
                for r in records:
                    got += 1
                    offsets[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
                    if a.print_records:
                        print(f"RECORD {r.partition} {r.offset} {(r.key or b'').decode('utf-8', 'backslashreplace')}",
                              flush=True)
            if offsets:
                consumer.commit(offsets)     # synchronous: what we counted is committed
    finally:
        consumer.close()                     # leaves the group
    print(f"CONSUMED {got}", flush=True)


# ---------------------------------------------------------------------- headers

def produce_raw(bootstrap, topic, partition, key, value, headers, timeout_s):
    """Produce one record with kafka-python's own protocol and record encoder.

    KafkaProducer.send() only accepts (str, bytes) headers: it refuses a None
    (null) header value with a TypeError, although kafka-python's v2 record
    encoder (DefaultRecordBatchBuilder) writes None as a null value (length
    -1) and its decoder returns it as None. So this one record goes through
    the layers below send(): a MemoryRecordsBuilder batch in a ProduceRequest
    (acks=all) on kafka-python's network client, whose request versions come
    from ApiVersions as usual. Internal API of the pinned kafka-python 3.0.x.
    """
    from kafka.net.compat import KafkaNetClient
    from kafka.protocol.producer import ProduceRequest
    from kafka.record.memory_records import MemoryRecordsBuilder

    client = KafkaNetClient(bootstrap_servers=bootstrap, client_id=CLIENT_ID,
                            request_timeout_ms=min(timeout_s * 1000, 30000))
    try:
        client.check_version(timeout_ms=timeout_s * 1000)    # bootstrap + ApiVersions
        tp = TopicPartition(topic, partition)
        deadline = time.monotonic() + timeout_s
        leader = None
        while leader is None or leader < 0:
            if time.monotonic() > deadline:
                raise Failure(f"no leader for {topic}/{partition} after {timeout_s}s (does the topic exist?)", 3)
            client.poll(timeout_ms=1000, future=client.cluster.add_topic(topic))
            leader = client.cluster.leader_for_partition(tp)
            if leader is None or leader < 0:
                client.cluster.request_update()
                time.sleep(0.2)
        builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20)
        if builder.append(int(time.time() * 1000), key, value, headers) is None:
            raise Failure("record does not fit in one batch")
        builder.close()
        topic_data = ProduceRequest.TopicProduceData
        req = ProduceRequest(
            transactional_id=None, acks=-1, timeout_ms=min(timeout_s * 1000, 30000),
            topic_data=[topic_data(name=topic, partition_data=[
                topic_data.PartitionProduceData(index=partition, records=builder.buffer())])],
            min_version=3, max_version=9)  # v3+: record batches (magic 2) with headers
        resp = client.send_and_receive(leader, req, timeout_ms=timeout_s * 1000)
        for t in resp.responses:
            for p in t.partition_responses:
                if p.error_code != 0:
                    err = kafka.errors.for_code(p.error_code)
                    raise Failure(f"produce to {topic}/{partition} failed: {err.__name__} "
                                  f"({p.error_code}) {p.error_message or ''}".rstrip())
                return p.base_offset
        raise Failure(f"produce response has no answer for {topic}/{partition}: {resp}")
    finally:
        client.close()


def headers_json(headers):
    return [{"key": k, "value": None if v is None else v.decode("utf-8", "backslashreplace")} for k, v in headers]


def cmd_headers(a):
    token = uuid.uuid4().hex[:12]
    key = f"python:headers-{token}".encode("utf-8")
    sent = [
        ("waymark.test.dup", f"first-{token}".encode()),
        ("waymark.test.dup", f"second-{token}".encode()),
        ("waymark.test.null", None),
    ]
    value = envelope(f"headers-{token}", f"headers-{token}", "kafka-python headers")
    offset = produce_raw(a.bootstrap, a.topic, 0, key, value, sent, a.timeout)

    consumer = KafkaConsumer(
        bootstrap_servers=a.bootstrap, client_id=CLIENT_ID, group_id=None, api_version=None,
        auto_offset_reset="earliest", enable_auto_commit=False,
        bootstrap_timeout_ms=a.timeout * 1000)
    deadline = time.monotonic() + a.timeout
    found = None
    try:
        parts = consumer.partitions_for_topic(a.topic) or {0}
        tps = [TopicPartition(a.topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        while found is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"timed out after {a.timeout}s: record {key.decode()} (partition 0, "
                              f"offset {offset}) not read back", 3)
            for records in consumer.poll(timeout_ms=int(min(left, 1.0) * 1000)).values():
                for r in records:
                    if r.key == key:
                        found = r
    finally:
        consumer.close()

    got = list(found.headers or [])
    print(json.dumps({"partition": found.partition, "offset": found.offset, "headers": headers_json(got)}),
          flush=True)
    if got != sent:
        raise Failure(f"headers did not round-trip: sent {headers_json(sent)}, got {headers_json(got)}")
    if found.value != value:
        raise Failure("the value did not round-trip")


# ------------------------------------------------------------------------- main

def main(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="kafka-python DEBUG logs on stderr")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, timeout=30):
        sp.add_argument("--bootstrap", required=True, help="host:port[,host:port...]")
        sp.add_argument("--topic", required=True)
        sp.add_argument("--timeout", type=int, default=timeout, help="seconds (default %(default)s)")

    sp = sub.add_parser("produce", help="produce N valid interaction.recorded events")
    common(sp)
    sp.add_argument("--count", type=int, required=True)
    sp.add_argument("--key-prefix", required=True)
    sp.add_argument("--no-idempotence", action="store_true",
                    help="plain acks=all producer (default: kafka-python's idempotent producer)")
    sp = sub.add_parser("consume", help="consume N records in a consumer group")
    common(sp)
    sp.add_argument("--group", required=True)
    sp.add_argument("--count", type=int, required=True)
    sp.add_argument("--print-records", action="store_true", help="print `RECORD partition offset key` lines")
    sp = sub.add_parser("headers", help="round-trip duplicate and null-valued headers")
    common(sp)
    a = p.parse_args(argv)
    if a.timeout < 1:
        p.error("--timeout must be >= 1")

    logging.basicConfig(level=logging.DEBUG if a.debug else logging.ERROR, stream=sys.stderr,
                        format=f"{PROG}: %(levelname)s %(name)s: %(message)s")
    if not a.debug:  # kafka-python repeats its errors on every retry: show each one once
        seen = set()

        def once(record):
            msg = (record.name, record.getMessage())
            new = msg not in seen
            seen.add(msg)
            return new
        for h in logging.getLogger().handlers:
            h.addFilter(once)
    try:
        {"produce": cmd_produce, "consume": cmd_consume, "headers": cmd_headers}[a.cmd](a)
    except Failure as e:
        sys.stderr.write(f"{PROG} {a.cmd}: error: {e}\n")
        return e.code
    except kafka.errors.KafkaTimeoutError as e:
        sys.stderr.write(f"{PROG} {a.cmd}: timeout: {e!r} (is a broker at {a.bootstrap}, "
                         f"does topic {a.topic} exist?)\n")
        return 3
    except (kafka.errors.KafkaError, OSError, ValueError, TypeError) as e:
        sys.stderr.write(f"{PROG} {a.cmd}: error: {e!r} (kafka-python {kafka.__version__}, bootstrap {a.bootstrap})\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
