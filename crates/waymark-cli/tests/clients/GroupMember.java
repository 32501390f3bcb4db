// A consumer-group member on the Apache Kafka Java client (KafkaConsumer,
// classic group protocol), for Waymark's integration tests: several of these
// processes join one group, and the tests read from their stdout how the
// group coordinator split and moved the partitions.
//
// Run (Java 17+, single-file source launch, no build):
//   java -cp "$WAYMARK_TEST_KAFKA_CLASSPATH" GroupMember.java \
//       BOOTSTRAP TOPIC GROUP NAME MAX_RECORDS TIMEOUT_SECONDS [STOPFILE]
// ($WAYMARK_TEST_KAFKA_CLASSPATH: `scripts/test-clients env` or
//  `scripts/dev-services kafka-classpath`.)
//
// stdout, one line per event, flushed at once (everything else, including the
// client's own logging, goes to stderr):
//   ASSIGNED <name> <partitions>   rebalance listener: partitions given to us
//   REVOKED <name> <partitions>    rebalance listener: partitions taken away
//   LOST <name> <partitions>       rebalance listener: partitions lost (session expired)
//   RECORD <name> <partition> <offset> <key>
//   COMMIT_FAILED <name> <partitions> <exception>   a commit lost to a rebalance
//                                  (not fatal; those records get redelivered)
//   STOPPED <name> <records> <max|timeout|stopfile|signal>
//   CLOSED <name>                  after close(): we have left the group
// <partitions> is comma-separated and sorted ("0,1"), or "-" when empty;
// <key> is the key as UTF-8, or "<null>".
//
// Offsets are committed synchronously after each poll (only those of the
// records printed). It stops after MAX_RECORDS records (0: no limit), after TIMEOUT_SECONDS,
// when STOPFILE exists, or on SIGTERM/SIGINT; then it closes the consumer.
// Exit 0 on any of those stops (143 on SIGTERM: the JVM's own exit code
// after its shutdown hooks), 1 on an error, 2 on bad arguments.
//
// The assignor defaults to the eager RangeAssignor (every rebalance revokes
// all and assigns the full new set, so ASSIGNED lines are complete
// assignments); -Dwaymark.assignor=cooperative-sticky|sticky|roundrobin|range
// picks another (with cooperative-sticky, ASSIGNED/REVOKED list only the
// partitions added/removed).

import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Collection;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.stream.Collectors;

import org.apache.kafka.clients.consumer.CloseOptions;
import org.apache.kafka.clients.consumer.CommitFailedException;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRebalanceListener;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.RebalanceInProgressException;
import org.apache.kafka.common.errors.WakeupException;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class GroupMember {
    // Our protocol lines go to the real stdout; System.out is pointed at
    // stderr before any Kafka class loads, so nothing else can mix in.
    private static final PrintStream OUT = System.out;

    private static synchronized void emit(String line) {
        OUT.println(line);
        OUT.flush();
    }

    private static String parts(Collection<TopicPartition> tps) {
        if (tps.isEmpty()) return "-";
        return tps.stream().map(TopicPartition::partition).sorted()
                .map(String::valueOf).collect(Collectors.joining(","));
    }

    private static String assignor(String name) {
        switch (name) {
            case "range": return "org.apache.kafka.clients.consumer.RangeAssignor";
            case "roundrobin": return "org.apache.kafka.clients.consumer.RoundRobinAssignor";
            case "sticky": return "org.apache.kafka.clients.consumer.StickyAssignor";
            case "cooperative-sticky": return "org.apache.kafka.clients.consumer.CooperativeStickyAssignor";
            default: throw new IllegalArgumentException("unknown -Dwaymark.assignor=" + name
                    + " (range, roundrobin, sticky, cooperative-sticky)");
        }
    }

    private static void usage(String why) {
        System.err.println("GroupMember: " + why);
        System.err.println("usage: java -cp KAFKA_CLASSPATH GroupMember.java BOOTSTRAP TOPIC GROUP NAME MAX_RECORDS TIMEOUT_SECONDS [STOPFILE]");
        System.exit(2);
    }

    public static void main(String[] args) {
        System.setOut(System.err);
        if (args.length < 6 || args.length > 7) usage("expected 6 or 7 arguments, got " + args.length);
        String bootstrap = args[0], topic = args[1], group = args[2], name = args[3];
        long max = 0, timeoutS = 0;
        try {
            max = Long.parseLong(args[4]);
            timeoutS = Long.parseLong(args[5]);
        } catch (NumberFormatException e) {
            usage("MAX_RECORDS and TIMEOUT_SECONDS must be integers: " + e.getMessage());
        }
        if (max < 0 || timeoutS < 1) usage("MAX_RECORDS must be >= 0 and TIMEOUT_SECONDS >= 1");
        Path stopFile = args.length == 7 ? Path.of(args[6]) : null;
        if (name.isEmpty() || name.chars().anyMatch(Character::isWhitespace)) usage("NAME must be one word");

        int code;
        try {
            code = run(bootstrap, topic, group, name, max, timeoutS, stopFile);
        } catch (Exception e) {
            System.err.println("GroupMember " + name + ": error: " + e);
            code = 1;
        }
        System.exit(code);
    }

    private static int run(String bootstrap, String topic, String group, String name,
                           long max, long timeoutS, Path stopFile) {
        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        p.put(ConsumerConfig.CLIENT_ID_CONFIG, "waymark-test-" + name);
        p.put(ConsumerConfig.GROUP_PROTOCOL_CONFIG, "classic");
        p.put(ConsumerConfig.PARTITION_ASSIGNMENT_STRATEGY_CONFIG,
                assignor(System.getProperty("waymark.assignor", "range")));
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        p.put(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, "10000");
        p.put(ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG, "1000");
        p.put(ConsumerConfig.MAX_POLL_RECORDS_CONFIG, String.valueOf(max == 0 ? 500 : Math.min(max, 500)));
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());

        KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(p);
        // SIGTERM/SIGINT: wake the poll up, let the main thread close (and so
        // leave the group), and wait for it before the JVM exits.
        CountDownLatch done = new CountDownLatch(1);
        AtomicBoolean signalled = new AtomicBoolean(false);
        Thread hook = new Thread(() -> {
            signalled.set(true);
            consumer.wakeup();
            try { done.await(15, TimeUnit.SECONDS); } catch (InterruptedException ignored) { }
        });
        Runtime.getRuntime().addShutdownHook(hook);

        long count = 0;
        String reason = "timeout";
        try {
            consumer.subscribe(List.of(topic), new ConsumerRebalanceListener() {
                @Override public void onPartitionsRevoked(Collection<TopicPartition> tps) { emit("REVOKED " + name + " " + parts(tps)); }
                @Override public void onPartitionsAssigned(Collection<TopicPartition> tps) { emit("ASSIGNED " + name + " " + parts(tps)); }
                @Override public void onPartitionsLost(Collection<TopicPartition> tps) { emit("LOST " + name + " " + parts(tps)); }
            });
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(timeoutS);
            while (true) {
                if (count >= max && max > 0) { reason = "max"; break; }
                if (stopFile != null && Files.exists(stopFile)) { reason = "stopfile"; break; }
                if (signalled.get()) { reason = "signal"; break; }
                long left = deadline - System.nanoTime();
                if (left <= 0) { reason = "timeout"; break; }
                ConsumerRecords<byte[], byte[]> records;
                try {
                    records = consumer.poll(Duration.ofNanos(Math.min(left, TimeUnit.MILLISECONDS.toNanos(200))));
                } catch (WakeupException e) {
                    reason = "signal";
                    break;
                }
                Map<TopicPartition, OffsetAndMetadata> commit = new HashMap<>();
                for (ConsumerRecord<byte[], byte[]> r : records) {
                    if (max > 0 && count >= max) break; // not printed, not committed: redelivered to the next owner
                    String key = r.key() == null ? "<null>" : new String(r.key(), StandardCharsets.UTF_8);
                    emit("RECORD " + name + " " + r.partition() + " " + r.offset() + " " + key);
                    commit.put(new TopicPartition(r.topic(), r.partition()), new OffsetAndMetadata(r.offset() + 1));
                    count++;
                }
                if (!commit.isEmpty()) {
                    try {
                        consumer.commitSync(commit);
                    } catch (RebalanceInProgressException | CommitFailedException e) {
                        // Not fatal: the next poll rejoins; those records will be redelivered.
                        emit("COMMIT_FAILED " + name + " " + parts(commit.keySet()) + " " + e.getClass().getSimpleName());
                    }
                }
            }
            emit("STOPPED " + name + " " + count + " " + reason);
        } finally {
            try {
                // LEAVE_GROUP: a LeaveGroup request, so the others get our
                // partitions at once instead of after the session timeout.
                consumer.close(CloseOptions.timeout(Duration.ofSeconds(10))
                        .withGroupMembershipOperation(CloseOptions.GroupMembershipOperation.LEAVE_GROUP));
                emit("CLOSED " + name);
            } finally {
                done.countDown();
            }
        }
        try { Runtime.getRuntime().removeShutdownHook(hook); } catch (IllegalStateException ignored) { /* shutting down */ }
        return 0;
    }
}
