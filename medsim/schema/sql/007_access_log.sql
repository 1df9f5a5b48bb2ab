-- The access log as a hash chain (Certificate Transparency's idea, without the Merkle
-- tree: a log read end to end by `medsim access-log verify` needs only the chain).
--
-- Every row's row_hash is SHA-256 over the previous row's hash and this row's content;
-- a trigger computes it, so no writer (the service, a script, psql) can forget it. What
-- this detects, checked by tests/test_attacks.py: an UPDATE or DELETE made with the
-- append-only trigger disabled (or session_replication_role = replica), a row inserted
-- with the chain trigger off (a backdated one included), a table swapped for a copy. What
-- it cannot detect alone: an owner who rewrites every row after the change with correct
-- hashes. For that, copy `medsim access-log verify`'s last line (the head's hash) somewhere
-- the database owner cannot write, now and then; `verify --anchor HASH` then fails on a
-- rewritten chain (docs/operations.md, "The access log").

-- The one canonical form of a row. Never change it: every stored hash was computed with
-- it (a new form would be a new column and a new chain). Timestamps as integer
-- microseconds since the epoch, so the session's TimeZone and DateStyle do not matter.
CREATE OR REPLACE FUNCTION medsim.access_log_digest(r medsim.access_log) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sha256(coalesce(r.prev_hash, '\x'::bytea) || convert_to(jsonb_build_array(
        r.chain_seq, r.id, (extract(epoch FROM r.at) * 1000000)::bigint, r.user_name, r.token_id, r.client,
        r.forwarded, r.action, r.query_kind, r.query_image_id, r.query_sha256, r.model_id, r.engine,
        r.image_ids, r.detail)::text, 'UTF8'))
$$;

-- Rows chain one at a time: the head's row lock is held to the writer's commit. A row
-- lock and not an advisory lock: a SQL login can take any advisory lock (and would stall
-- every request that logs), but not a lock on a row it may not update. The row's time is
-- taken under the lock, so time never goes backwards along the chain.
CREATE OR REPLACE FUNCTION medsim.chain_log_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    h record;
BEGIN
    SELECT chain_seq, row_hash INTO h FROM medsim.access_log_head FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'medsim.access_log_head is empty: the chain has no end to extend (run medsim migrate)';
    END IF;
    NEW.chain_seq := h.chain_seq + 1;
    NEW.prev_hash := h.row_hash;
    NEW.at := clock_timestamp();
    NEW.row_hash := medsim.access_log_digest(NEW);
    UPDATE medsim.access_log_head SET chain_seq = NEW.chain_seq, row_hash = NEW.row_hash;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER chain BEFORE INSERT ON medsim.access_log
    FOR EACH ROW EXECUTE FUNCTION medsim.chain_log_row();

-- Genesis, once: the rows written before revision 0019 are chained in id order when the
-- head does not exist yet. Once it exists this does nothing, so applying sql/ again never
-- re-chains (and so never launders) a row someone altered.
DO $$
DECLARE
    r medsim.access_log;
    v_seq bigint := 0;
    v_prev bytea := '\x0000000000000000000000000000000000000000000000000000000000000000';
BEGIN
    IF EXISTS (SELECT 1 FROM medsim.access_log_head) THEN
        RETURN;
    END IF;
    ALTER TABLE medsim.access_log DISABLE TRIGGER append_only;
    FOR r IN SELECT * FROM medsim.access_log ORDER BY id LOOP
        v_seq := v_seq + 1;
        r.chain_seq := v_seq;
        r.prev_hash := v_prev;
        v_prev := medsim.access_log_digest(r);
        UPDATE medsim.access_log SET chain_seq = v_seq, prev_hash = r.prev_hash, row_hash = v_prev
        WHERE id = r.id;
    END LOOP;
    ALTER TABLE medsim.access_log ENABLE TRIGGER append_only;
    INSERT INTO medsim.access_log_head (chain_seq, row_hash) VALUES (v_seq, v_prev);
END
$$;

REVOKE ALL ON medsim.access_log_head FROM medsim_reader;
