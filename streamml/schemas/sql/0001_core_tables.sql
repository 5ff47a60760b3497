-- streamml core tables. Applied in order by the migration runner (streamml.streams.warehouse)
-- into the configured database (STREAMML_CLICKHOUSE_DATABASE). Never edit an applied
-- migration: add a new numbered file instead.

-- Every prediction of every model version and role. Re-delivery after a crash writes the
-- same (pipeline, model_version, ts, event_id) again; ReplacingMergeTree keeps one row.
CREATE TABLE IF NOT EXISTS predictions
(
    pipeline        LowCardinality(String),
    event_id        String,
    entity_key      String,
    ts              DateTime64(3, 'UTC'),
    model_name      LowCardinality(String),
    model_version   String,
    role            LowCardinality(String),
    served          UInt8,
    score           Float64,
    predicted_class String,
    probabilities   Map(String, Float64),
    latency_ms      Float64,
    e2e_latency_ms  Float64,
    trace_id        String,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toDate(ts)
ORDER BY (pipeline, model_version, ts, event_id);

-- Ground truth as it arrives on <p>.labels.
CREATE TABLE IF NOT EXISTS labels
(
    pipeline      LowCardinality(String),
    event_id      String,
    entity_key    String,
    ts            DateTime64(3, 'UTC'),
    label         String,
    label_value   Float64,
    inserted_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toDate(ts)
ORDER BY (pipeline, event_id);

-- Prequential metrics over the labels of one minute, per model version, role, metric and
-- source partition (each partition has its own online model). Combine partitions with
-- sum(value * n) / sum(n). The latest row of a minute wins.
CREATE TABLE IF NOT EXISTS metrics
(
    pipeline          LowCardinality(String),
    model_version     String,
    role              LowCardinality(String),
    metric            LowCardinality(String),
    window_start      DateTime('UTC'),
    source_partition  UInt32 DEFAULT 0,
    value             Float64,
    n                 UInt64,
    updated_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
PARTITION BY toDate(window_start)
ORDER BY (pipeline, model_version, role, metric, window_start, source_partition);

-- One row per drift detection.
CREATE TABLE IF NOT EXISTS drift_events
(
    pipeline       LowCardinality(String),
    model_version  String,
    detector       LowCardinality(String),
    kind           LowCardinality(String),
    target         String,
    statistic      Float64,
    threshold      Float64,
    window_size    UInt64,
    ts             DateTime64(3, 'UTC'),
    drift_id       String,
    details        String
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(ts)
ORDER BY (pipeline, model_version, ts, drift_id);

-- Mirror of the model registry: one row per version and stage change (latest wins).
CREATE TABLE IF NOT EXISTS model_versions
(
    pipeline        LowCardinality(String),
    model_name      LowCardinality(String),
    version         String,
    stage           LowCardinality(String),
    kind            LowCardinality(String),
    artifact_uri    String,
    sha256          String,
    spec_hash       String,
    features        Array(String),
    train_start     Nullable(DateTime64(3, 'UTC')),
    train_end       Nullable(DateTime64(3, 'UTC')),
    metrics         Map(String, Float64),
    parent_version  String,
    traffic_share   Float64,
    created_at      DateTime64(3, 'UTC'),
    updated_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (pipeline, model_name, version);

-- Records that failed validation, with the original bytes and where they came from.
-- Keyed on the source offset, so a re-delivered bad record is counted once.
CREATE TABLE IF NOT EXISTS dead_letters
(
    pipeline     LowCardinality(String),
    topic        String,
    partition    UInt32,
    offset       UInt64,
    ts           DateTime64(3, 'UTC'),
    error_class  LowCardinality(String),
    reason       String,
    payload      String,
    key          String,
    inserted_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toDate(ts)
ORDER BY (pipeline, topic, partition, offset);
