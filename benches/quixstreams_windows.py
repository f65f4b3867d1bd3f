"""The peer of `traitline bench metrics` on the same Kafka broker: the same
windows computed by quixstreams (PyPI), a Python stream processor with
RocksDB window state, so both are measured in one run.

    pip install quixstreams
    python3 benches/quixstreams_windows.py --brokers 127.0.0.1:9092 \
        --events 200000 --users 10000

It runs two applications, each in a consumer group of its own: a
per-user tumbling 1-hour count (`views_hourly` in the bench) and a
per-user hopping 5-minute average of the price every minute
(`price_moving_average`). Each prints events/s and events per
CPU-second, timed from the first record it processed to the last.

With `--copy-from`, they read a copy (same partitions, keys, values and lz4 compression)
of a topic `traitline bench metrics --kafka-brokers` filled
(`bench-XXXXXXXX-user_events`, named in the bench's first line): the
records Traitline reads, windowed as its definitions window them, on
the envelope's `timestamp` (event time), taking the same events
(`bench.product.view` tracks; events with a user id and a price). (A
copy, because quixstreams reads a topic's retention settings, which
tansu describes only when they were given at its creation.) Without it,
they write `--events` small events of their own (a user id key, a JSON
value with a price) to a new topic and window them on the broker's
timestamps: less to parse than the bench's events.
"""

import argparse
import json
import logging
import time
import uuid
from datetime import datetime

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from quixstreams import Application
from quixstreams.models import TopicConfig


def fill(brokers, topic, events, users):
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "enable.idempotence": True})
    for n in range(events):
        user = f"user-{(n * 2_654_435_761) % users}"
        value = {"type": "track", "event": "bench.product.view", "userId": user,
                 "messageId": f"bench-{n}", "properties": {"product": f"p-{n % 1000}", "price": 19.99}}
        while True:
            try:
                producer.produce(topic, key=user, value=json.dumps(value))
                break
            except BufferError:
                producer.poll(0.1)
        if n % 10_000 == 0:
            producer.poll(0)
    producer.flush(60)


def copy(brokers, source, topic, events):
    """Copies the first `events` records of `source` to `topic`, each to
    its partition there."""
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"quix-bench-copy-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([source])
    # Compressed as Traitline's producer compresses the source (lz4, its
    # default), so both read the same batches and pay their decompression.
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "enable.idempotence": True,
                         "compression.type": "lz4"})
    copied, idle = 0, 0
    while copied < events:
        messages = consumer.consume(10_000, 1.0)
        idle = 0 if messages else idle + 1
        if idle == 10:
            raise RuntimeError(f"{source} has {copied} records, not {events}")
        for message in messages:
            if message.error():
                raise RuntimeError(message.error())
            while True:
                try:
                    producer.produce(topic, key=message.key(), value=message.value(), partition=message.partition())
                    break
                except BufferError:
                    producer.poll(0.1)
            copied += 1
        producer.poll(0)
    consumer.close()
    producer.flush(60)


def event_time(value, _headers, timestamp, _type):
    """The envelope's `timestamp` in milliseconds, as Traitline windows it;
    the broker's timestamp for a value that has none."""
    text = value.get("timestamp") if isinstance(value, dict) else None
    return int(datetime.fromisoformat(text).timestamp() * 1000) if text else timestamp


def measure(brokers, topic_name, partitions, events, window, envelopes):
    app = Application(
        broker_address=brokers,
        consumer_group=f"quix-bench-{window}-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        state_dir=f"/tmp/quix-bench-state-{uuid.uuid4().hex[:8]}",
        loglevel=logging.WARNING,
        # quixstreams' default; Traitline's runners are exactly once.
        processing_guarantee="at-least-once",
    )
    topic = app.topic(
        topic_name,
        value_deserializer="json",
        config=TopicConfig(
            num_partitions=partitions,
            replication_factor=1,
            extra_config={"retention.ms": "604800000", "retention.bytes": "-1"},
        ),
        timestamp_extractor=event_time if envelopes else None,
    )
    seen = {"n": 0, "t0": None, "cpu0": None, "t1": None, "cpu1": None}

    def count(_value):
        if seen["n"] == 0:
            seen["t0"], seen["cpu0"] = time.monotonic(), time.process_time()
        seen["n"] += 1
        if seen["n"] == events:
            seen["t1"], seen["cpu1"] = time.monotonic(), time.process_time()
            app.stop()

    sdf = app.dataframe(topic)
    sdf = sdf.update(count)
    if window == "tumbling-count":
        if envelopes:
            sdf = sdf.filter(lambda v: v.get("type") == "track" and v.get("event") == "bench.product.view")
        sdf = sdf.tumbling_window(duration_ms=3_600_000).count().final()
    else:
        if envelopes:
            sdf = sdf.filter(lambda v: bool(v.get("userId")) and "price" in v.get("properties", {}))
        sdf = sdf.apply(lambda v: v["properties"]["price"])
        sdf = sdf.hopping_window(duration_ms=300_000, step_ms=60_000).mean().final()
    app.run()
    seconds = seen["t1"] - seen["t0"]
    cpu = seen["cpu1"] - seen["cpu0"]
    print(f"| quixstreams {window} | {events} | {seconds:.2f} | {events / seconds:.0f} | {events / max(cpu, 0.01):.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--copy-from", help="a topic the Traitline bench filled, copied as it is")
    args = parser.parse_args()
    topic = f"quix-bench-{uuid.uuid4().hex[:8]}"
    t = time.monotonic()
    create_topic(args.brokers, topic, args.partitions)
    if args.copy_from:
        print(f"copying {args.events} records of {args.copy_from} to {topic}")
        copy(args.brokers, args.copy_from, topic, args.events)
    else:
        print(f"writing {args.events} events for {args.users} users to {topic}")
        fill(args.brokers, topic, args.events, args.users)
    print(f"written in {time.monotonic() - t:.1f} s")
    print("| processor | events | seconds | events/s | events per CPU-second |")
    print("|---|---|---|---|---|")
    for window in ("tumbling-count", "hopping-average"):
        measure(args.brokers, topic, args.partitions, args.events, window, args.copy_from is not None)


def create_topic(brokers, topic, partitions):
    """Creates the topic with the retention configs quixstreams reads
    (tansu describes only the configs given at creation)."""
    admin = AdminClient({"bootstrap.servers": brokers})
    futures = admin.create_topics([NewTopic(topic, partitions, 1, config={
        "retention.ms": "604800000", "retention.bytes": "-1"})])
    for future in futures.values():
        future.result(30)


if __name__ == "__main__":
    main()
