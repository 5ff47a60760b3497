"""Moving records: topic names and codecs, Kafka clients with clear failures, the warehouse."""
