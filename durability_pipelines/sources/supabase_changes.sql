-- durability_pipelines change feed: an append-only change log filled by a row trigger.
--
-- A template: {log}, {fn}, {txid_idx} and {table_idx} are replaced with quoted identifiers by
-- install_change_feed() (psycopg.sql), never by string formatting. Idempotent; install_change_feed()
-- runs it under an advisory lock so that concurrent installs do not race on CREATE ... IF NOT EXISTS.
--
-- Readers order rows by (txid, id), not by id alone, and only read rows whose transaction is older
-- than every transaction still running (txid < pg_snapshot_xmin(pg_current_snapshot())): no row can
-- ever appear below that horizon again, so a cursor never passes a change that commits later.
CREATE TABLE IF NOT EXISTS {log} (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  -- the writing transaction (64-bit, never wraps); ordering key and visibility guard
  txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
  schema_name text NOT NULL,
  table_name text NOT NULL,
  operation text NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
  record jsonb,      -- NEW row (NULL for DELETE)
  old_record jsonb,  -- OLD row (NULL for INSERT)
  -- when the trigger ran (clock_timestamp), NOT the commit time: a change captured early in a long
  -- transaction is older than its commit, so this is "captured at", good for lag metrics only.
  captured_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- (txid, id) order for unfiltered readers, and per-table order for readers of one source table.
CREATE INDEX IF NOT EXISTS {txid_idx} ON {log} (txid, id);
CREATE INDEX IF NOT EXISTS {table_idx} ON {log} (schema_name, table_name, txid, id);

-- The log holds full row images: keep it away from Supabase API roles (anon/authenticated get
-- nothing without a policy). The owner, superusers and BYPASSRLS roles (service_role) still read it.
ALTER TABLE {log} ENABLE ROW LEVEL SECURITY;

-- SECURITY DEFINER: the roles that write the source table (e.g. Supabase's authenticated role)
-- need no privilege on the log. search_path is pinned so the definer's rights cannot be hijacked.
CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO {log} (schema_name, table_name, operation, record, old_record)
  VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP,
          CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE to_jsonb(NEW) END,
          CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END);
  RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION {fn}() FROM PUBLIC;

-- Removals: a DELETE or TRUNCATE of log rows that is not the project's purge is recorded here (per
-- source table: the lowest and highest removed position, how many rows, who, when), so that a reader
-- whose checkpoint lies below a removed range treats it as trimmed data (trim_policy) instead of
-- reading on past a hole. Identity ids leave holes on rollback, so a hole in the ids proves nothing:
-- only a record written by the removing statement itself does. The purge (purge_acked) sets
-- durability.purge = on for its own statements (SET LOCAL); nothing else should.
CREATE TABLE IF NOT EXISTS {removals} (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  schema_name text NOT NULL,
  table_name text NOT NULL,
  operation text NOT NULL CHECK (operation IN ('DELETE', 'TRUNCATE')),
  from_position numeric NOT NULL,  -- lowest removed position (txid * 10^19 + id)
  to_position numeric NOT NULL,    -- highest removed position
  row_count bigint NOT NULL,
  removed_by text NOT NULL,        -- session_user of the removing statement
  application_name text,
  txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
  removed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS {removals_idx} ON {removals} (to_position);
ALTER TABLE {removals} ENABLE ROW LEVEL SECURITY;

-- One function for both triggers: AFTER DELETE (statement level, the deleted rows as a transition
-- table) and BEFORE TRUNCATE (no transition table: the rows are still there to be summarised).
CREATE OR REPLACE FUNCTION {removal_fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF coalesce(current_setting('durability.purge', true), '') = 'on' THEN
    RETURN NULL;
  END IF;
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO {removals} (schema_name, table_name, operation, from_position, to_position, row_count,
                            removed_by, application_name)
    SELECT schema_name, table_name, 'TRUNCATE', min(txid::text::numeric * 1e19 + id),
           max(txid::text::numeric * 1e19 + id), count(*), session_user, current_setting('application_name')
    FROM {log} GROUP BY schema_name, table_name;
  ELSE
    INSERT INTO {removals} (schema_name, table_name, operation, from_position, to_position, row_count,
                            removed_by, application_name)
    SELECT schema_name, table_name, 'DELETE', min(txid::text::numeric * 1e19 + id),
           max(txid::text::numeric * 1e19 + id), count(*), session_user, current_setting('application_name')
    FROM durability_removed GROUP BY schema_name, table_name;
  END IF;
  RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION {removal_fn}() FROM PUBLIC;

CREATE OR REPLACE TRIGGER {delete_trigger} AFTER DELETE ON {log}
  REFERENCING OLD TABLE AS durability_removed FOR EACH STATEMENT EXECUTE FUNCTION {removal_fn}();
CREATE OR REPLACE TRIGGER {truncate_trigger} BEFORE TRUNCATE ON {log}
  FOR EACH STATEMENT EXECUTE FUNCTION {removal_fn}();
