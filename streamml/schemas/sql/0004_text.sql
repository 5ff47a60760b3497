-- Step 8: what the language models said about the events.
-- Weak labels: one row per event and labeller (source: zero_shot:<feature> or
-- generative), with the labeller's model version and confidence. Training may use them
-- where no true label came; joined with labels they measure each labeller.
CREATE TABLE IF NOT EXISTS annotations
(
    pipeline       LowCardinality(String),
    event_id       String,
    ts             DateTime64(3, 'UTC'),
    source         LowCardinality(String),
    model_version  String,
    label          String,
    confidence     Float64,
    inserted_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toDate(ts)
ORDER BY (pipeline, event_id, source);

-- Events where the served model and the weak labeller disagreed, both confident; the
-- generative judge's verdict on a sample of them (judge = '' when not judged).
CREATE TABLE IF NOT EXISTS flags
(
    pipeline          LowCardinality(String),
    event_id          String,
    ts                DateTime64(3, 'UTC'),
    model_version     String,
    predicted_class   String,
    served_confidence Float64,
    source            LowCardinality(String),
    weak_label        String,
    weak_confidence   Float64,
    judge             String,
    judge_model       String,
    inserted_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toDate(ts)
ORDER BY (pipeline, event_id);

-- Summaries of a sample of the events' text, made off the hot path.
CREATE TABLE IF NOT EXISTS summaries
(
    pipeline       LowCardinality(String),
    event_id       String,
    ts             DateTime64(3, 'UTC'),
    method         LowCardinality(String),
    model_version  String,
    summary        String,
    inserted_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toDate(ts)
ORDER BY (pipeline, event_id);
