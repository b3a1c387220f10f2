-- Tables of the consumer layer. Idempotent (see durability_pipelines.consumer.storage.migrate).

-- Batches that exhausted their retries. status: open (the shard is stopped under the
-- 'stop' policy) | retry (an operator asked for a retry: dispatch resumes) | resolved.
CREATE TABLE IF NOT EXISTS dead_letters (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  consumer TEXT NOT NULL, adapter TEXT NOT NULL, stream TEXT NOT NULL, grp TEXT NOT NULL,
  shard TEXT NOT NULL, first_sequence TEXT NOT NULL, last_sequence TEXT NOT NULL,
  record_count INT NOT NULL, error TEXT NOT NULL, attempts INT NOT NULL,
  policy TEXT NOT NULL, run_id TEXT, payload JSONB,
  status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'retry', 'resolved')),
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  resolved_at TIMESTAMPTZ, resolved_by TEXT, note TEXT);
CREATE INDEX IF NOT EXISTS dead_letters_open_idx ON dead_letters (consumer, shard) WHERE status = 'open';

-- Audit rows for data the stream no longer had (trim policy skip_to_trim_horizon).
CREATE TABLE IF NOT EXISTS stream_gaps (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  consumer TEXT NOT NULL, adapter TEXT NOT NULL, stream TEXT NOT NULL, grp TEXT NOT NULL,
  shard TEXT NOT NULL, from_sequence TEXT, to_sequence TEXT, reason TEXT NOT NULL, run_id TEXT,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW());

-- Mirror of each sensor's Dagster cursor (the dispatched positions), for failover.
CREATE TABLE IF NOT EXISTS sensor_cursors (
  sensor_name TEXT PRIMARY KEY, cursor TEXT NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW());

-- The default handler's sink: one row per event, replay-safe.
CREATE TABLE IF NOT EXISTS stream_events (
  stream TEXT NOT NULL, shard TEXT NOT NULL, sequence TEXT NOT NULL,
  adapter TEXT NOT NULL, event_name TEXT NOT NULL, keys JSONB, new_image JSONB, old_image JSONB,
  event_created_at TIMESTAMPTZ, event_id TEXT, consumer TEXT,
  inserted_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  PRIMARY KEY (stream, shard, sequence));
