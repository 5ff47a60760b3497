"""expiry: per-entity state past the entity TTL leaves memory and the state changelog.

An entity's windows and last-n values are kept while its newest event lies within
``spec.entity_ttl_s`` of the partition's event-time clock (the newest event featurized in
the partition). Older ones are dropped and tombstoned (``WINDOW + entity`` -> None) in the
compacted changelog, so the log cleaner removes them and a restore reads live entities
only. Event time, not wall clock: an expired window would be empty anyway, and replaying a
backfill of years stays as bounded as the live stream. The clock is capped at the wall
clock, so one record dated in the future cannot expire every entity of its partition.

The windows are kept in the order their entities were last touched
(:class:`~streamml.agents.runtime.EntityWindows`), so each call reads only the expired
front and stops at the first live entity: no scan of every entity. Run between batches
by ``housekeeping`` in :mod:`streamml.agents.learn`.
"""

from __future__ import annotations

import time

from streamml.agents.runtime import WINDOW, PartitionState, PipelineRuntime, last_seen_ms
from streamml.streams.outbox import Outbox

# At most this many entities expire per partition and call (about 50 ms): a jump in event
# time does not stall the batch loop; the rest go in the next calls, a second apart.
EXPIRE_MAX_PER_CALL = 50_000


def expire_entities(
    rt: PipelineRuntime,
    state: PartitionState,
    out: Outbox,
    now_ms: float | None = None,
    limit: int = EXPIRE_MAX_PER_CALL,
) -> int:
    """Drop the partition's entities not seen within the TTL and queue their tombstones;
    also tombstone those a restore left out as already expired. Returns how many went;
    counts them in ``entities_expired`` and sets ``entities_live`` (a gauge: windows held
    by all of this worker's partitions of the pipeline)."""
    topic = rt.topics["state"]
    wall_ms = time.time() * 1000 if now_ms is None else now_ms
    cutoff = min(state.stats.clock_ms, wall_ms) - rt.spec.entity_ttl_s * 1000
    windows = state.windows
    expired: list[str] = []
    for entity, window in windows.items():  # longest untouched first
        if len(expired) >= limit or last_seen_ms(window) >= cutoff:
            break
        expired.append(entity)
    for entity in expired:
        del windows[entity]
        state.dirty_windows.discard(entity)
        out.add(topic, state.partition, WINDOW + entity.encode(), None)
    n = len(expired)
    if state.stale:
        room = max(0, limit - n)
        stale, state.stale = state.stale[:room], state.stale[room:]
        for entity in stale:
            if entity not in windows:  # not back since the restore: still expired
                out.add(topic, state.partition, WINDOW + entity.encode(), None)
                n += 1
    rt.counters["entities_expired"] += n
    rt.counters["entities_live"] = sum(len(s.windows) for s in rt.states.values())
    return n
