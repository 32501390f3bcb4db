package dev.waymark.bench;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.ObjectReader;
import java.io.BufferedWriter;
import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.time.Instant;
import java.time.OffsetDateTime;
import java.util.HashMap;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.Serializer;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StoreQueryParameters;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.InvalidStateStoreException;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.state.KeyValueIterator;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.QueryableStoreTypes;
import org.apache.kafka.streams.state.ReadOnlyKeyValueStore;

/**
 * The Kafka Streams peer of Waymark's S1 rebuild benchmark (issue 13): the person fold over
 * {@code waymark.events}. Per person (record key = person_id) it keeps event_count,
 * interaction_count (events of type {@code interaction.recorded}), first_seen and last_seen (min /
 * max of the envelope's {@code time}), in the default persistent (RocksDB) store with its changelog,
 * at-least-once, Kafka Streams' default settings otherwise.
 *
 * <p>It runs until the aggregator has seen {@code --expected} records (applied plus skipped), closes
 * the instance (which flushes the record cache, writes the changelog and commits the offsets) and
 * prints one JSON line to stdout:
 *
 * <pre>
 * {"records": N, "skipped": K, "persons": P, "event_count_sum": E, "interaction_count_sum": I,
 *  "wall_secs": W, "process_cpu_secs": C, "close_secs": X, "first_record_secs": F}
 * </pre>
 *
 * records = records consumed (applied + skipped); wall_secs and process_cpu_secs cover
 * {@code streams.start()} to the return of {@code streams.close()}. On a timeout or an ERROR state it
 * prints {@code {"error": ...}} to stderr and exits with status 1.
 *
 * <pre>
 * java -cp "$(cat target/kstreams/classpath)" dev.waymark.bench.PersonFold \
 *   --bootstrap 127.0.0.1:9092 --expected 100000 --application-id peer-$(date +%s) \
 *   --state-dir /tmp/kstreams-state [--topic waymark.events] [--timeout-secs 600] \
 *   [--verify] [--dump FILE]
 * </pre>
 *
 * {@code --verify} (debug, perturbs the timing) scans the store through an interactive query before
 * closing and adds the store's totals ({@code "store_persons"}, {@code "store_event_count_sum"},
 * {@code "store_interaction_count_sum"}, {@code "verify_secs"}); {@code --dump FILE} also writes
 * one line per person: {@code person_id,event_count,interaction_count,first_seen,last_seen}.
 */
public final class PersonFold {
  static final String STORE = "person-fold";
  static final String INTERACTION = "interaction.recorded";

  private PersonFold() {}

  // ------------------------------------------------------------------ the event

  /** The two envelope fields the fold reads; every other field is skipped by the parser. */
  @JsonIgnoreProperties(ignoreUnknown = true)
  public static final class Envelope {
    public String type;
    public String time;
  }

  /** A parsed event: whether it is an interaction, and its time in microseconds since the epoch. */
  static final class Event {
    /** The value could not be parsed (not JSON, no type, no valid time): counted as skipped. */
    static final Event INVALID = new Event(false, 0);

    final boolean interaction;
    final long timeMicros;

    Event(boolean interaction, long timeMicros) {
      this.interaction = interaction;
      this.timeMicros = timeMicros;
    }
  }

  /** Deserializes the Waymark envelope; never throws (an unparseable value is Event.INVALID). */
  static final class EventDeserializer implements Deserializer<Event> {
    private static final ObjectReader READER =
        new ObjectMapper()
            .configure(DeserializationFeature.FAIL_ON_UNKNOWN_PROPERTIES, false)
            .readerFor(Envelope.class);

    @Override
    public Event deserialize(String topic, byte[] data) {
      if (data == null) {
        return null;
      }
      try {
        Envelope e = READER.readValue(data);
        if (e == null || e.type == null || e.time == null) {
          return Event.INVALID;
        }
        Instant t = OffsetDateTime.parse(e.time).toInstant();
        long micros = Math.addExact(Math.multiplyExact(t.getEpochSecond(), 1_000_000L), t.getNano() / 1_000);
        return new Event(INTERACTION.equals(e.type), micros);
      } catch (IOException | RuntimeException ex) {
        return Event.INVALID;
      }
    }
  }

  /** Only deserializes: the fold never writes events (groupByKey needs no repartition topic). */
  static final class EventSerde implements Serde<Event> {
    @Override
    public Serializer<Event> serializer() {
      return (topic, data) -> {
        throw new UnsupportedOperationException("events are never serialized");
      };
    }

    @Override
    public Deserializer<Event> deserializer() {
      return new EventDeserializer();
    }
  }

  // ------------------------------------------------------------------ the state

  /** One person's row. first_seen / last_seen are epoch microseconds. */
  static final class PersonState {
    final long eventCount;
    final long interactionCount;
    final long firstSeen;
    final long lastSeen;

    PersonState(long eventCount, long interactionCount, long firstSeen, long lastSeen) {
      this.eventCount = eventCount;
      this.interactionCount = interactionCount;
      this.firstSeen = firstSeen;
      this.lastSeen = lastSeen;
    }

    static PersonState empty() {
      return new PersonState(0, 0, Long.MAX_VALUE, Long.MIN_VALUE);
    }
  }

  /** Four big-endian longs (32 bytes): event_count, interaction_count, first_seen, last_seen. */
  static final class PersonStateSerde implements Serde<PersonState> {
    static final int SIZE = 4 * Long.BYTES;

    @Override
    public Serializer<PersonState> serializer() {
      return (topic, s) -> {
        if (s == null) {
          return null;
        }
        return ByteBuffer.allocate(SIZE)
            .putLong(s.eventCount)
            .putLong(s.interactionCount)
            .putLong(s.firstSeen)
            .putLong(s.lastSeen)
            .array();
      };
    }

    @Override
    public Deserializer<PersonState> deserializer() {
      return (topic, data) -> {
        if (data == null) {
          return null;
        }
        if (data.length != SIZE) {
          throw new IllegalStateException("person state of " + data.length + " bytes, expected " + SIZE);
        }
        ByteBuffer b = ByteBuffer.wrap(data);
        return new PersonState(b.getLong(), b.getLong(), b.getLong(), b.getLong());
      };
    }
  }

  // ---------------------------------------------------------------- the counters

  /** Written by the stream thread, read by the main thread. */
  static final class Progress {
    final long expected;
    final AtomicLong applied = new AtomicLong(); // = the sum of event_count over all persons
    final AtomicLong skipped = new AtomicLong();
    final AtomicLong persons = new AtomicLong();
    final AtomicLong interactions = new AtomicLong(); // = the sum of interaction_count
    final AtomicLong seen = new AtomicLong(); // applied + skipped
    final AtomicLong firstRecordNanos = new AtomicLong(-1);
    final CountDownLatch done = new CountDownLatch(1);

    Progress(long expected) {
      this.expected = expected;
    }

    void count() {
      if (seen.incrementAndGet() == expected) {
        done.countDown();
      }
    }

    void skip() {
      skipped.incrementAndGet();
      count();
    }
  }

  static Topology topology(String topic, Progress p) {
    StreamsBuilder builder = new StreamsBuilder();
    builder.stream(topic, Consumed.with(Serdes.String(), new EventSerde()))
        // Null keys, null values and unparseable values: groupByKey/aggregate would drop the
        // first two silently; all three are counted as skipped here.
        .filter(
            (key, event) -> {
              if (key == null || event == null || event == Event.INVALID) {
                p.skip();
                return false;
              }
              return true;
            })
        .groupByKey()
        .aggregate(
            PersonState::empty,
            (key, e, old) -> {
              if (old.eventCount == 0) {
                p.persons.incrementAndGet();
              }
              if (e.interaction) {
                p.interactions.incrementAndGet();
              }
              if (p.applied.incrementAndGet() == 1) {
                p.firstRecordNanos.set(System.nanoTime());
              }
              p.count();
              return new PersonState(
                  old.eventCount + 1,
                  old.interactionCount + (e.interaction ? 1 : 0),
                  Math.min(old.firstSeen, e.timeMicros),
                  Math.max(old.lastSeen, e.timeMicros));
            },
            // The default persistent store (RocksDB) with its changelog; only named and given serdes.
            Materialized.<String, PersonState, KeyValueStore<Bytes, byte[]>>as(STORE)
                .withKeySerde(Serdes.String())
                .withValueSerde(new PersonStateSerde()));
    return builder.build();
  }

  // ------------------------------------------------------------------- the main

  static final class Args {
    String bootstrap;
    String topic = "waymark.events";
    long expected = -1;
    String applicationId;
    String stateDir;
    long timeoutSecs = 600;
    boolean verify;
    String dump;
  }

  static final String USAGE =
      "usage: PersonFold --bootstrap HOST:PORT --expected N --application-id ID --state-dir DIR\n"
          + "                  [--topic waymark.events] [--timeout-secs 600] [--verify] [--dump FILE]";

  static Args parse(String[] argv) {
    Args a = new Args();
    for (int i = 0; i < argv.length; i++) {
      String name = argv[i];
      String value = null;
      int eq = name.indexOf('=');
      if (name.startsWith("--") && eq > 0) {
        value = name.substring(eq + 1);
        name = name.substring(0, eq);
      }
      if (name.equals("--help") || name.equals("-h")) {
        System.out.println(USAGE);
        System.exit(0);
      }
      if (name.equals("--verify")) {
        a.verify = true;
        continue;
      }
      if (value == null) {
        if (i + 1 >= argv.length) {
          usageError("missing value for " + name);
        }
        value = argv[++i];
      }
      try {
        switch (name) {
          case "--bootstrap" -> a.bootstrap = value;
          case "--topic" -> a.topic = value;
          case "--expected" -> a.expected = Long.parseLong(value);
          case "--application-id" -> a.applicationId = value;
          case "--state-dir" -> a.stateDir = value;
          case "--timeout-secs" -> a.timeoutSecs = Long.parseLong(value);
          case "--dump" -> a.dump = value;
          default -> usageError("unknown option " + name);
        }
      } catch (NumberFormatException e) {
        usageError("not a number for " + name + ": " + value);
      }
    }
    if (a.bootstrap == null) usageError("--bootstrap is required");
    if (a.expected < 1) usageError("--expected N (N >= 1) is required");
    if (a.applicationId == null) usageError("--application-id is required");
    if (a.stateDir == null) usageError("--state-dir is required");
    if (a.timeoutSecs < 1) usageError("--timeout-secs must be >= 1");
    if (a.dump != null) a.verify = true;
    return a;
  }

  static void usageError(String msg) {
    System.err.println("PersonFold: " + msg);
    System.err.println(USAGE);
    System.exit(2);
  }

  static long cpuNanos() {
    return ((com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean())
        .getProcessCpuTime();
  }

  static String secs(long nanos) {
    return String.format(Locale.ROOT, "%.6f", nanos / 1e9);
  }

  static String jsonString(String s) {
    StringBuilder b = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      switch (c) {
        case '"' -> b.append("\\\"");
        case '\\' -> b.append("\\\\");
        case '\n' -> b.append("\\n");
        case '\r' -> b.append("\\r");
        case '\t' -> b.append("\\t");
        default -> {
          if (c < 0x20) {
            b.append(String.format(Locale.ROOT, "\\u%04x", (int) c));
          } else {
            b.append(c);
          }
        }
      }
    }
    return b.append('"').toString();
  }

  /** Prints {"error": ...} with the counters so far to stderr, closes briefly and exits 1. */
  static void fail(KafkaStreams streams, Progress p, String why, long t0) {
    System.err.println(
        "{\"error\": "
            + jsonString(why)
            + ", \"records\": "
            + p.seen.get()
            + ", \"expected\": "
            + p.expected
            + ", \"skipped\": "
            + p.skipped.get()
            + ", \"persons\": "
            + p.persons.get()
            + ", \"elapsed_secs\": "
            + secs(System.nanoTime() - t0)
            + "}");
    System.err.flush();
    try {
      streams.close(Duration.ofSeconds(30));
    } catch (RuntimeException ignored) {
      // exiting anyway
    }
    System.exit(1);
  }

  /** The store's totals through an interactive query (before close): store_persons, sums. */
  static Map<String, Long> verify(KafkaStreams streams, String dump) throws IOException, InterruptedException {
    ReadOnlyKeyValueStore<String, PersonState> store = null;
    for (int attempt = 0; store == null; attempt++) {
      try {
        store =
            streams.store(
                StoreQueryParameters.fromNameAndType(STORE, QueryableStoreTypes.<String, PersonState>keyValueStore()));
      } catch (InvalidStateStoreException e) {
        if (attempt >= 100) {
          throw e;
        }
        Thread.sleep(100);
      }
    }
    long persons = 0, events = 0, interactions = 0;
    BufferedWriter out = dump == null ? null : Files.newBufferedWriter(Path.of(dump), StandardCharsets.UTF_8);
    try (KeyValueIterator<String, PersonState> it = store.all()) {
      while (it.hasNext()) {
        KeyValue<String, PersonState> kv = it.next();
        PersonState s = kv.value;
        persons++;
        events += s.eventCount;
        interactions += s.interactionCount;
        if (out != null) {
          out.write(
              kv.key + "," + s.eventCount + "," + s.interactionCount + ","
                  + micros(s.firstSeen) + "," + micros(s.lastSeen) + "\n");
        }
      }
    } finally {
      if (out != null) {
        out.close();
      }
    }
    Map<String, Long> r = new HashMap<>();
    r.put("store_persons", persons);
    r.put("store_event_count_sum", events);
    r.put("store_interaction_count_sum", interactions);
    return r;
  }

  static String micros(long m) {
    if (m == Long.MAX_VALUE || m == Long.MIN_VALUE) {
      return "";
    }
    return Instant.EPOCH.plusSeconds(Math.floorDiv(m, 1_000_000L)).plusNanos(Math.floorMod(m, 1_000_000L) * 1_000L).toString();
  }

  public static void main(String[] argv) throws Exception {
    Args a = parse(argv);

    Properties props = new Properties();
    props.put(StreamsConfig.APPLICATION_ID_CONFIG, a.applicationId);
    props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, a.bootstrap);
    props.put(StreamsConfig.STATE_DIR_CONFIG, a.stateDir);
    // A fresh application id has no committed offsets: start from the beginning of the topic.
    props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    // Everything else (processing.guarantee at_least_once, caching, commit.interval.ms,
    // num.stream.threads = 1, replication.factor = the broker's default, ...) is left at Kafka
    // Streams' defaults on purpose.

    Progress p = new Progress(a.expected);
    KafkaStreams streams = new KafkaStreams(topology(a.topic, p), props);
    AtomicReference<String> error = new AtomicReference<>();
    streams.setUncaughtExceptionHandler(
        e -> {
          error.compareAndSet(null, "stream thread failed: " + e);
          p.done.countDown();
          return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
    streams.setStateListener(
        (now, before) -> {
          if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.PENDING_ERROR) {
            error.compareAndSet(null, "Kafka Streams went to state " + now + " (from " + before + ")");
            p.done.countDown();
          }
        });

    long cpu0 = cpuNanos();
    long t0 = System.nanoTime();
    streams.start();

    boolean finished = p.done.await(a.timeoutSecs, TimeUnit.SECONDS);
    if (error.get() != null) {
      fail(streams, p, error.get(), t0);
    }
    if (!finished) {
      fail(streams, p, "timed out after " + a.timeoutSecs + "s: " + p.seen.get() + " of " + a.expected
          + " records processed (state " + streams.state() + ")", t0);
    }

    Map<String, Long> store = null;
    long verifyNanos = 0;
    if (a.verify) {
      long v0 = System.nanoTime();
      store = verify(streams, a.dump);
      verifyNanos = System.nanoTime() - v0;
    }

    long c0 = System.nanoTime();
    boolean closed = streams.close(Duration.ofMinutes(2));
    long t1 = System.nanoTime();
    long cpu1 = cpuNanos();
    if (!closed) {
      fail(streams, p, "close did not finish within 2 minutes", t0);
    }
    if (error.get() != null) {
      fail(streams, p, error.get(), t0);
    }

    long first = p.firstRecordNanos.get();
    StringBuilder json = new StringBuilder("{");
    json.append("\"records\": ").append(p.seen.get());
    json.append(", \"skipped\": ").append(p.skipped.get());
    json.append(", \"persons\": ").append(p.persons.get());
    json.append(", \"event_count_sum\": ").append(p.applied.get());
    json.append(", \"interaction_count_sum\": ").append(p.interactions.get());
    json.append(", \"wall_secs\": ").append(secs(t1 - t0));
    json.append(", \"process_cpu_secs\": ").append(secs(cpu1 - cpu0));
    json.append(", \"close_secs\": ").append(secs(t1 - c0));
    json.append(", \"first_record_secs\": ").append(first < 0 ? "null" : secs(first - t0));
    if (store != null) {
      json.append(", \"store_persons\": ").append(store.get("store_persons"));
      json.append(", \"store_event_count_sum\": ").append(store.get("store_event_count_sum"));
      json.append(", \"store_interaction_count_sum\": ").append(store.get("store_interaction_count_sum"));
      json.append(", \"verify_secs\": ").append(secs(verifyNanos));
    }
    json.append("}");
    System.out.println(json);
    System.out.flush();
    System.exit(0);
  }
}
