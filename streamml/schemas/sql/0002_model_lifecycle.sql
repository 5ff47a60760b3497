-- Step 3: batch training reads features back; the registry's extra facts; the audit trail.

-- The feature vector of every scored event, as the features step computed it at event
-- time (point-in-time correct by construction). Training joins it with labels.
CREATE TABLE IF NOT EXISTS features
(
    pipeline     LowCardinality(String),
    event_id     String,
    entity_key   String,
    ts           DateTime64(3, 'UTC'),
    features     Map(String, Float64),
    inserted_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toDate(ts)
ORDER BY (pipeline, ts, event_id);

ALTER TABLE model_versions ADD COLUMN IF NOT EXISTS mode LowCardinality(String) DEFAULT '';
ALTER TABLE model_versions ADD COLUMN IF NOT EXISTS task LowCardinality(String) DEFAULT '';
ALTER TABLE model_versions ADD COLUMN IF NOT EXISTS classes Array(String);
ALTER TABLE model_versions ADD COLUMN IF NOT EXISTS train_rows UInt64 DEFAULT 0;
ALTER TABLE model_versions ADD COLUMN IF NOT EXISTS params String DEFAULT '{}';

-- Every event on streamml.control (drift detected, retrain requested, trained, evaluated,
-- registered, shadowed, promoted, archived, rolled back, alerts): what, when, why and the
-- versions involved.
CREATE TABLE IF NOT EXISTS audit_events
(
    pipeline     LowCardinality(String),
    event_id     String,
    ts           DateTime64(3, 'UTC'),
    action       LowCardinality(String),
    version      String,
    previous     String,
    reason       String,
    actor        String,
    details      String,
    inserted_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toDate(ts)
ORDER BY (pipeline, ts, event_id);
