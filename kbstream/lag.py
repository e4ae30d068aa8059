"""Consumer lag of every stage group, read from the broker by someone outside
the groups (`kbstream top`, tests): each group's committed offsets through a
consumer of that group id that never subscribes (so it never joins or
rebalances the group), and each input partition's high watermark.

tansu's memory engine under-reports a high watermark when asked directly
(see infra/kafka/observe.high_watermark) but its fetch responses are right,
so a reader consumer also fetches a little of each partition (at most one
small fetch per partition per read, paused in between)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_END, Consumer
from confluent_kafka import TopicPartition as TP

from infra.kafka.observe import high_watermark
from infra.kafka.security import client_config

log = logging.getLogger(__name__)


@dataclass
class GroupLag:
    group: str
    # (topic, partition) -> (committed offset or None, high watermark)
    partitions: dict[tuple[str, int], tuple[int | None, int]] = field(default_factory=dict)

    @property
    def committed(self) -> int:
        """Events the group has committed, all partitions together."""
        return sum(c or 0 for c, _ in self.partitions.values())

    @property
    def lag(self) -> int:
        return sum(max(0, h - (c or 0)) for c, h in self.partitions.values())


def _consumer(bootstrap: str, group: str, **extra: object) -> Consumer:
    return Consumer(
        client_config(
            bootstrap,
            **{
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                **extra,
            },
        ),
        logger=logging.getLogger("rdkafka"),
    )


class LagReader:
    """``groups``: consumer group -> the physical topics it reads."""

    def __init__(self, bootstrap: str, groups: Mapping[str, Sequence[str]], timeout: float = 5.0):
        self.groups = {g: list(t) for g, t in groups.items()}
        self.timeout = timeout
        self._members = {g: _consumer(bootstrap, g) for g in self.groups}
        self._reader = _consumer(
            bootstrap,
            f"kbstream-lag-reader-{uuid.uuid4().hex[:8]}",  # commits nothing
            **{"fetch.wait.max.ms": 100, "max.partition.fetch.bytes": 1024},
        )
        self._assigned: list[TP] = []

    def _partitions(self) -> dict[str, list[int]]:
        topics = sorted({t for ts in self.groups.values() for t in ts})
        md = self._reader.list_topics(timeout=self.timeout)
        return {t: sorted(md.topics[t].partitions) if t in md.topics else [] for t in topics}

    def _pump(self, parts: list[TP]) -> None:
        """One small fetch per partition, for the high watermarks in their responses."""
        if {(p.topic, p.partition) for p in parts} != {
            (p.topic, p.partition) for p in self._assigned
        }:
            self._reader.assign([TP(p.topic, p.partition, OFFSET_END) for p in parts])
            self._assigned = parts
        else:
            self._reader.resume(parts)
        self._reader.consume(len(parts), timeout=0.3)
        self._reader.pause(parts)

    def read(self) -> dict[str, GroupLag]:
        parts_of = self._partitions()
        parts = [TP(t, p) for t, ps in parts_of.items() for p in ps]
        if parts:
            self._pump(parts)
        high = {(p.topic, p.partition): high_watermark(self._reader, p)[1] for p in parts}
        out = {}
        for group, topics in self.groups.items():
            mine = [TP(t, p) for t in topics for p in parts_of.get(t, [])]
            committed = self._members[group].committed(mine, timeout=self.timeout) if mine else []
            lag = GroupLag(group)
            for tp in committed:
                offset = tp.offset if tp.offset >= 0 else None
                lag.partitions[(tp.topic, tp.partition)] = (offset, high[(tp.topic, tp.partition)])
            out[group] = lag
        return out

    def close(self) -> None:
        for c in [*self._members.values(), self._reader]:
            try:
                c.close()
            except Exception:  # a broker already gone
                log.debug("lag reader close failed", exc_info=True)
