-- Step 4: alert transitions (a rule firing or resolving), from the alert events on
-- streamml.control. The same events are in audit_events; this table is for dashboards.
CREATE TABLE IF NOT EXISTS alerts
(
    pipeline     LowCardinality(String),
    event_id     String,
    ts           DateTime64(3, 'UTC'),
    rule         String,
    state        LowCardinality(String),
    metric       LowCardinality(String),
    value        Float64,
    threshold    Float64,
    message      String,
    inserted_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toDate(ts)
ORDER BY (pipeline, ts, event_id);
