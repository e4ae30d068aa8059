"""Clients other than our own confluent-kafka code against the embedded tansu
broker. kafka-python (pure Python, its own protocol code) publishes a document
and six kinds of garbage as an upstream system would; the pipeline (SQLite,
milvus-lite, the real model) indexes the document and dead-letters the garbage,
which kafka-python reads back with its kb-* headers.

kcat: Debian's kcat links librdkafka 2.0.2, which cannot read tansu's
ApiVersions response (librdkafka skipped one byte too few per tagged field
before 2.2.0: confluentinc/librdkafka#4278). The tests check the two
workarounds README.md documents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.documents import IndexingStatus
from tests.harness import Pipeline, make_settings

DATASET = "third-party"
DOC_ID = "kp-1"
DOC = {"dataset_id": DATASET, "document_id": DOC_ID, "source": "tides.txt"}
TEXT = "High tide at the harbour arrives forty minutes later each day."

# key -> (value as sent, what kb-error must say)
GARBAGE: dict[str, tuple[bytes | None, str]] = {
    "g-invalid-json": (b'{"type": "document.created", "dataset_id": ', "not valid JSON"),
    "g-unknown-type": (
        json.dumps({**DOC, "type": "document.teleported", "content": TEXT}).encode(),
        "'document.teleported' found using 'type' does not match",
    ),
    "g-schema-version": (
        json.dumps(
            {**DOC, "type": "document.created", "content": TEXT, "schema_version": 99}
        ).encode(),
        "unsupported schema_version 99",
    ),
    "g-schema-invalid": (  # neither content nor uri
        json.dumps({**DOC, "type": "document.created"}).encode(),
        "exactly one of 'content' and 'uri' must be given",
    ),
    "g-empty": (None, "empty message (no value)"),
    "g-not-utf8": (b"\x80\x81\xfe\xff garbage \xc0\xaf", "'utf-8' codec can't decode"),
}


@pytest.fixture
def pipeline(tmp_path: Path, tansu: str, topic_prefix: str) -> Iterator[Pipeline]:
    settings = make_settings(tmp_path / "home", tansu, topic_prefix)  # SQLite
    with Pipeline(settings) as p:
        yield p


@pytest.mark.e2e
def test_kafka_python_publishes_a_document_and_garbage(pipeline: Pipeline) -> None:
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    p = pipeline
    assert p.settings.brokers
    topics = p.container.topics
    producer = KafkaProducer(bootstrap_servers=p.settings.brokers, acks="all")
    try:
        for key, (value, _) in GARBAGE.items():
            producer.send(topics.lifecycle, key=key.encode(), value=value).get(timeout=30)
        created = {**DOC, "type": "document.created", "content": TEXT}
        producer.send(
            topics.lifecycle, key=DOC_ID.encode(), value=json.dumps(created).encode()
        ).get(timeout=30)
    finally:
        producer.close()

    doc = p.wait_for(DATASET, [DOC_ID], timeout=180)[DOC_ID]
    assert doc.status is IndexingStatus.COMPLETED, doc
    snap = p.snapshot(DATASET, DOC_ID)
    assert snap.segments and snap.consistent, snap

    consumer = KafkaConsumer(
        bootstrap_servers=p.settings.brokers, enable_auto_commit=False, group_id=None
    )
    try:
        partitions = consumer.partitions_for_topic(topics.dlq)
        assert partitions, f"no partitions for {topics.dlq}"
        consumer.assign([TopicPartition(topics.dlq, n) for n in sorted(partitions)])
        consumer.seek_to_beginning()
        letters = []
        deadline = time.monotonic() + 60
        quiet_since = time.monotonic()
        # all six, then 2 s more to catch a seventh (the document must not be one)
        while time.monotonic() < deadline and (
            len(letters) < len(GARBAGE) or time.monotonic() - quiet_since < 2
        ):
            batch = [r for rs in consumer.poll(timeout_ms=500).values() for r in rs]
            if batch:
                letters.extend(batch)
                quiet_since = time.monotonic()
    finally:
        consumer.close()

    by_key = {r.key.decode(): r for r in letters}
    assert sorted(by_key) == sorted(GARBAGE) and len(letters) == len(GARBAGE), [
        (r.key, dict(r.headers)) for r in letters
    ]
    for key, (value, says) in GARBAGE.items():
        letter = by_key[key]
        headers = {k: v.decode() for k, v in letter.headers}
        assert letter.value == value, key  # the original bytes, byte for byte
        assert headers["kb-stage"] == "parse", (key, headers)
        assert headers["kb-error-class"] == "InvalidEvent", (key, headers)
        assert headers["kb-error"].startswith("InvalidEvent: "), (key, headers)
        assert says in headers["kb-error"], (key, headers)
        assert headers["kb-original-topic"] == topics.lifecycle, (key, headers)


# -- kcat ---------------------------------------------------------------------


def _kcat() -> str:
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        pytest.skip("kcat is not installed (apt-get install kcat); CI does not install it")
    return kcat


def _wheel_librdkafka(into: Path) -> Path:
    """A directory holding the confluent-kafka wheel's librdkafka (>= 2.2) as
    librdkafka.so.1, for LD_LIBRARY_PATH."""
    import confluent_kafka

    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    found = sorted(libs.glob("librdkafka*.so.1"))
    if not found:
        pytest.skip(f"no bundled librdkafka in {libs} (not a manylinux wheel)")
    into.mkdir(parents=True, exist_ok=True)
    (into / "librdkafka.so.1").symlink_to(found[0])
    return into


def _run(cmd: list[str], env: dict[str, str] | None = None, stdin: str = "") -> str:
    proc = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.integration
def test_kcat_with_a_current_librdkafka(tansu: str, topic_prefix: str, tmp_path: Path) -> None:
    """Any kcat binary works once it loads librdkafka >= 2.2.0."""
    kcat = _kcat()
    env = {**os.environ, "LD_LIBRARY_PATH": str(_wheel_librdkafka(tmp_path / "rdkafka"))}
    assert "librdkafka 2." in _run([kcat, "-V"], env)
    topic = f"{topic_prefix}kcat"
    _run([kcat, "-b", tansu, "-P", "-t", topic, "-k", "k1", "-H", "kb-x=1"], env, "hello\n")
    out = _run(
        [kcat, "-b", tansu, "-C", "-t", topic, "-o", "beginning", "-e", "-f", "%k|%s|%h\n"],
        env,
    )
    assert out.strip().splitlines() == ["k1|hello|kb-x=1"]
    assert f'topic "{topic}"' in _run([kcat, "-b", tansu, "-L"], env)


@pytest.mark.integration
def test_kcat_legacy_protocol_lists_metadata(tansu: str) -> None:
    """Debian's kcat (librdkafka 2.0.2) as it is: skipping the ApiVersions
    request with a pre-0.10 protocol fallback gets metadata (and reads from
    explicit offsets), but not produce, group consumption or offset queries."""
    kcat = _kcat()
    out = _run(
        [
            kcat,
            "-b",
            tansu,
            "-X",
            "api.version.request=false",
            "-X",
            "broker.version.fallback=0.9.0",
            "-L",
        ]
    )
    assert f"at {tansu}" in out, out
