-- A Supabase-compatible `realtime` schema for local use and tests: realtime.messages and
-- realtime.send() as a Supabase project has them (Realtime's own migrations), so that code calling
-- realtime.send() runs unchanged against plain Postgres. install_realtime_fixture() applies it only
-- where no real realtime.send exists, under an advisory lock; it is idempotent.
--
-- Differences from a Supabase project, on purpose:
--   * not partitioned by inserted_at (Realtime creates daily partitions and drops them after 72 h);
--     nothing here ever deletes a message.
--   * nothing reads the table: no Realtime server tails it. tests/support/realtime_server.py can
--     poll it (publish_from_db) and fan rows out to websocket subscribers.
--   * no RLS policies for private channels (the table has RLS enabled and no policy, so API roles
--     see nothing, as on a project without policies).
CREATE SCHEMA IF NOT EXISTS realtime;

CREATE TABLE IF NOT EXISTS realtime.messages (
  topic text NOT NULL,
  extension text NOT NULL DEFAULT 'broadcast',
  payload jsonb,
  event text,
  private boolean DEFAULT false,
  updated_at timestamp without time zone NOT NULL DEFAULT now(),
  inserted_at timestamp without time zone NOT NULL DEFAULT now(),  -- transaction start, as on Supabase
  id uuid NOT NULL DEFAULT gen_random_uuid(),
  PRIMARY KEY (id, inserted_at)
);
CREATE INDEX IF NOT EXISTS messages_inserted_at_topic_index ON realtime.messages (inserted_at DESC, topic);
ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;

-- The documented contract: insert one broadcast message; add payload.id (= the message id) when the
-- payload has none; never fail the caller's transaction: errors become a WARNING and the message
-- is simply not there. Callers that need the message must check that it landed.
CREATE OR REPLACE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  generated_id uuid;
  final_payload jsonb;
BEGIN
  BEGIN
    generated_id := gen_random_uuid();
    IF payload ? 'id' THEN
      final_payload := payload;
    ELSE
      final_payload := jsonb_set(payload, '{id}', to_jsonb(generated_id));
    END IF;
    EXECUTE format('SET LOCAL realtime.topic TO %L', topic);
    INSERT INTO realtime.messages (id, payload, event, topic, private, extension)
    VALUES (generated_id, final_payload, event, topic, private, 'broadcast');
  EXCEPTION
    WHEN OTHERS THEN
      RAISE WARNING 'ErrorSendingBroadcastMessage: %', SQLERRM;
  END;
END;
$$;

COMMENT ON FUNCTION realtime.send(jsonb, text, text, boolean) IS 'durability_pipelines realtime fixture';
