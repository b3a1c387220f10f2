-- durability_pipelines checkpoint schema. Idempotent: safe to run on every start
-- and concurrently from several workers (guarded by an advisory lock in migrate()).
--
-- `checkpoints` is byte-for-byte the original pattern's table so that workers
-- already using that layout share checkpoints with this project.
CREATE TABLE IF NOT EXISTS checkpoints (
  adapter TEXT NOT NULL, stream TEXT NOT NULL, grp TEXT NOT NULL,
  consumer TEXT NOT NULL, shard TEXT NOT NULL, sequence TEXT NOT NULL,
  ts TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  PRIMARY KEY (adapter, stream, grp, consumer, shard));

-- Append-only audit trail of every advance.
CREATE TABLE IF NOT EXISTS checkpoint_history (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  adapter TEXT NOT NULL, stream TEXT NOT NULL, grp TEXT NOT NULL,
  consumer TEXT NOT NULL, shard TEXT NOT NULL,
  previous_sequence TEXT, new_sequence TEXT NOT NULL,
  writer TEXT, lease_epoch BIGINT, run_id TEXT, reason TEXT,
  ts TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
CREATE INDEX IF NOT EXISTS checkpoint_history_key_idx
  ON checkpoint_history (adapter, stream, grp, consumer, shard, id);

-- One lease per shard and consumer group; epoch = KCL's leaseCounter.
CREATE TABLE IF NOT EXISTS checkpoint_leases (
  adapter TEXT NOT NULL, stream TEXT NOT NULL, grp TEXT NOT NULL, shard TEXT NOT NULL,
  owner TEXT NOT NULL DEFAULT '', epoch BIGINT NOT NULL DEFAULT 0,
  expires_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  PRIMARY KEY (adapter, stream, grp, shard));
-- v6: graceful hand-off (KCL 3.x): the successor waiting for the lease, and who handed it to its owner.
ALTER TABLE checkpoint_leases
  ADD COLUMN IF NOT EXISTS requested_by TEXT NOT NULL DEFAULT '',
  ADD COLUMN IF NOT EXISTS requested_at TIMESTAMPTZ,
  ADD COLUMN IF NOT EXISTS handed_from TEXT NOT NULL DEFAULT '',
  ADD COLUMN IF NOT EXISTS handed_at TIMESTAMPTZ;

CREATE TABLE IF NOT EXISTS durability_schema_version (
  component TEXT PRIMARY KEY, version INT NOT NULL,
  applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW());

-- The one ordering (see ordering.py): TRIM_HORIZON < LATEST < numbers < SHARD_END.
-- Numbers compare as NUMERIC (exact, arbitrary size), never as text. Numbers have 1-129 digits
-- (ordering.MAX_DIGITS, Kinesis sequence numbers), so every one ranks below SHARD_END's 1e129 (v7).
CREATE OR REPLACE FUNCTION durability_invalid_sequence(s TEXT) RETURNS NUMERIC
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  RAISE EXCEPTION 'durability: invalid sequence %', quote_literal(left(s, 80))
    USING ERRCODE = '22P02', HINT = 'expected 1-129 digits, TRIM_HORIZON, LATEST or SHARD_END';
END $$;

-- The rank of a position, NULL for a value that is not one (reports must not fail on one bad row).
-- Plain SQL functions (not plpgsql, not STRICT), so the planner inlines them: bulk statements (mirror,
-- hybrid flush) call them twice per row.
CREATE OR REPLACE FUNCTION durability_sequence_rank_or_null(s TEXT) RETURNS NUMERIC
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE
    WHEN s ~ '^[0-9]{1,129}$' THEN s::NUMERIC
    WHEN s = 'TRIM_HORIZON' THEN -2
    WHEN s = 'LATEST' THEN -1
    WHEN s = 'SHARD_END' THEN 1e129
  END
$$;

-- The rank for comparisons that must refuse garbage (saves): the same order, an error for a non-position.
CREATE OR REPLACE FUNCTION durability_sequence_rank(s TEXT) RETURNS NUMERIC
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN s IS NULL THEN NULL
              ELSE coalesce(durability_sequence_rank_or_null(s), durability_invalid_sequence(s)) END
$$;

-- Positions that are not sequence numbers (SHARD_END, TRIM_HORIZON, LATEST): never in `checkpoints`,
-- whose `sequence` other workers feed to AT_SEQUENCE_NUMBER (see checkpoints/sentinels.py). A checkpoint's
-- position is the greater of its `checkpoints` number and its sentinel here.
CREATE TABLE IF NOT EXISTS checkpoint_sentinels (
  adapter TEXT NOT NULL, stream TEXT NOT NULL, grp TEXT NOT NULL,
  consumer TEXT NOT NULL, shard TEXT NOT NULL, sentinel TEXT NOT NULL,
  ts TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  PRIMARY KEY (adapter, stream, grp, consumer, shard));

-- Monotonic, fenced save in one round trip. Outcomes:
--   advanced | unchanged | stale | lease_lost (nothing written)
-- p_epoch NULL = unfenced (compatible with workers that use no leases).
CREATE OR REPLACE FUNCTION durability_save_checkpoint(
  p_adapter TEXT, p_stream TEXT, p_grp TEXT, p_consumer TEXT, p_shard TEXT,
  p_sequence TEXT, p_writer TEXT, p_epoch BIGINT, p_run_id TEXT, p_reason TEXT)
RETURNS TABLE (outcome TEXT, previous TEXT, lease_owner TEXT, lease_epoch BIGINT)
LANGUAGE plpgsql AS $$
-- Hot path (the row exists): one SELECT ... FOR UPDATE, then UPDATE + history when it advances;
-- each rank is computed once. A missing row is inserted (ON CONFLICT DO NOTHING waits for a
-- concurrent inserter, whose row is then locked and compared like any other).
-- A sentinel (SHARD_END, TRIM_HORIZON, LATEST) is saved in checkpoint_sentinels, never in checkpoints;
-- the previous position compared against is the greater of the two.
-- The fencing rule (as in checkpoint.lua): a fenced save needs the lease's owner and epoch, before the
-- lease expires (clock_timestamp(): the moment of the check, not the transaction's start).
DECLARE
  v_prev TEXT; v_owner TEXT; v_epoch BIGINT; v_expires TIMESTAMPTZ; v_rank NUMERIC; v_prev_rank NUMERIC;
  v_sent TEXT; v_sent_rank NUMERIC;
BEGIN
  v_rank := durability_sequence_rank(p_sequence);
  IF p_epoch IS NOT NULL THEN
    SELECT l.owner, l.epoch, l.expires_at INTO v_owner, v_epoch, v_expires FROM checkpoint_leases l
     WHERE l.adapter = p_adapter AND l.stream = p_stream AND l.grp = p_grp AND l.shard = p_shard
     FOR SHARE;
    IF NOT FOUND OR v_owner IS DISTINCT FROM p_writer OR v_epoch IS DISTINCT FROM p_epoch
       OR v_expires <= clock_timestamp() THEN
      outcome := 'lease_lost'; previous := NULL; lease_owner := v_owner; lease_epoch := v_epoch;
      RETURN NEXT;
      RETURN;
    END IF;
  END IF;
  lease_owner := v_owner; lease_epoch := v_epoch;
  SELECT s.sentinel INTO v_sent FROM checkpoint_sentinels s
   WHERE s.adapter = p_adapter AND s.stream = p_stream AND s.grp = p_grp
     AND s.consumer = p_consumer AND s.shard = p_shard;
  v_sent_rank := durability_sequence_rank_or_null(v_sent);
  IF v_rank < 0 OR v_rank >= 1e129 THEN
    -- A sentinel: compared against both places, written to checkpoint_sentinels only.
    SELECT c.sequence INTO v_prev FROM checkpoints c
     WHERE c.adapter = p_adapter AND c.stream = p_stream AND c.grp = p_grp
       AND c.consumer = p_consumer AND c.shard = p_shard
     FOR UPDATE;
    v_prev_rank := durability_sequence_rank(v_prev);
    IF v_sent_rank IS NOT NULL AND (v_prev_rank IS NULL OR v_sent_rank > v_prev_rank) THEN
      v_prev := v_sent; v_prev_rank := v_sent_rank;
    END IF;
    previous := v_prev;
    IF v_prev_rank IS NOT NULL AND v_prev_rank >= v_rank THEN
      outcome := CASE WHEN v_prev_rank = v_rank THEN 'unchanged' ELSE 'stale' END;
      RETURN NEXT;
      RETURN;
    END IF;
    INSERT INTO checkpoint_sentinels AS s (adapter, stream, grp, consumer, shard, sentinel, ts)
    VALUES (p_adapter, p_stream, p_grp, p_consumer, p_shard, p_sequence, NOW())
    ON CONFLICT (adapter, stream, grp, consumer, shard) DO UPDATE SET sentinel = EXCLUDED.sentinel, ts = NOW()
      WHERE coalesce(durability_sequence_rank_or_null(s.sentinel), -3) < v_rank;
    INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence,
                                    new_sequence, writer, lease_epoch, run_id, reason)
    VALUES (p_adapter, p_stream, p_grp, p_consumer, p_shard, v_prev, p_sequence, p_writer, p_epoch,
            p_run_id, p_reason);
    outcome := 'advanced';
    RETURN NEXT;
    RETURN;
  END IF;
  IF v_sent_rank >= 1e129 THEN  -- the shard ended: no number moves it
    outcome := CASE WHEN v_rank >= 1e129 THEN 'unchanged' ELSE 'stale' END; previous := v_sent;
    RETURN NEXT;
    RETURN;
  END IF;
  SELECT c.sequence INTO v_prev FROM checkpoints c
   WHERE c.adapter = p_adapter AND c.stream = p_stream AND c.grp = p_grp
     AND c.consumer = p_consumer AND c.shard = p_shard
   FOR UPDATE;
  IF NOT FOUND THEN
    INSERT INTO checkpoints AS c (adapter, stream, grp, consumer, shard, sequence, ts)
    VALUES (p_adapter, p_stream, p_grp, p_consumer, p_shard, p_sequence, NOW())
    ON CONFLICT (adapter, stream, grp, consumer, shard) DO NOTHING;
    IF FOUND THEN
      IF v_sent IS NOT NULL THEN  -- a TRIM_HORIZON / LATEST, now behind the number
        DELETE FROM checkpoint_sentinels s
         WHERE s.adapter = p_adapter AND s.stream = p_stream AND s.grp = p_grp
           AND s.consumer = p_consumer AND s.shard = p_shard AND s.sentinel <> 'SHARD_END';
      END IF;
      INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence,
                                      new_sequence, writer, lease_epoch, run_id, reason)
      VALUES (p_adapter, p_stream, p_grp, p_consumer, p_shard, v_sent, p_sequence, p_writer, p_epoch,
              p_run_id, p_reason);
      outcome := 'advanced'; previous := v_sent;
      RETURN NEXT;
      RETURN;
    END IF;
    SELECT c.sequence INTO v_prev FROM checkpoints c
     WHERE c.adapter = p_adapter AND c.stream = p_stream AND c.grp = p_grp
       AND c.consumer = p_consumer AND c.shard = p_shard
     FOR UPDATE;
  END IF;
  v_prev_rank := durability_sequence_rank(v_prev);
  previous := v_prev;
  IF v_prev_rank < v_rank THEN
    UPDATE checkpoints c SET sequence = p_sequence, ts = NOW()
     WHERE c.adapter = p_adapter AND c.stream = p_stream AND c.grp = p_grp
       AND c.consumer = p_consumer AND c.shard = p_shard;
    INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence,
                                    new_sequence, writer, lease_epoch, run_id, reason)
    VALUES (p_adapter, p_stream, p_grp, p_consumer, p_shard, v_prev, p_sequence, p_writer, p_epoch,
            p_run_id, p_reason);
    outcome := 'advanced';
  ELSIF v_prev_rank = v_rank THEN
    outcome := 'unchanged';
  ELSE
    outcome := 'stale';
  END IF;
  RETURN NEXT;
END $$;

-- What a worker that reads positions should see: the greater of the shared number and the sentinel.
CREATE OR REPLACE VIEW durability_checkpoint_positions AS
SELECT coalesce(c.adapter, s.adapter) AS adapter, coalesce(c.stream, s.stream) AS stream,
       coalesce(c.grp, s.grp) AS grp, coalesce(c.consumer, s.consumer) AS consumer,
       coalesce(c.shard, s.shard) AS shard,
       CASE WHEN s.sentinel IS NULL THEN c.sequence
            WHEN c.sequence IS NULL OR s.sentinel = 'SHARD_END' THEN s.sentinel
            ELSE c.sequence END AS sequence,
       coalesce(c.ts, s.ts) AS ts
FROM checkpoints c
FULL JOIN checkpoint_sentinels s
  ON s.adapter = c.adapter AND s.stream = c.stream AND s.grp = c.grp AND s.consumer = c.consumer
 AND s.shard = c.shard;
