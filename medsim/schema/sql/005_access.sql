-- Who may see which images: row-level security over everything that holds images,
-- embeddings or what is derived from them; one rule for the HTTP service, the FAISS
-- path (its selector is built from these same rows) and a person's own SQL session.
--
-- Threat model (docs/operations.md, "Access control"): a role sees the datasets granted
-- to it in medsim.dataset_grants, matched by current_user, never by a setting a session
-- could change. Each medsim user has a role of its own; the service SETs it per request.
-- Users inherit medsim_reader's privileges (WITH SET FALSE: they cannot become
-- medsim_reader, whose grant is every dataset). The database owner and superusers
-- bypass RLS: they are the administrators.

-- What the current role was granted. SECURITY INVOKER (the default): they read
-- dataset_grants as the caller, whose policy there shows only the caller's own rows.
CREATE OR REPLACE FUNCTION medsim.sees_all_datasets() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM medsim.dataset_grants g
                   WHERE g.role_name = current_user AND g.dataset_id IS NULL)
$$;

CREATE OR REPLACE FUNCTION medsim.granted_datasets() RETURNS integer[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(g.dataset_id), '{}') FROM medsim.dataset_grants g
    WHERE g.role_name = current_user AND g.dataset_id IS NOT NULL
$$;

-- Every policy calls them as (SELECT ...): an InitPlan, evaluated once per statement,
-- not once per row. A row whose visibility is its image's asks with a scalar subquery
-- (one primary-key probe per row the scan yields): written as EXISTS, the planner turned
-- it into a hashed subplan that read every image before an HNSW search returned 4 rows. Only SELECT policies: no reader role may write these tables, and
-- with RLS on, a command without a policy is refused.
DO $$
DECLARE
    p record;
BEGIN
    FOR p IN SELECT * FROM (VALUES
        ('dataset_grants', 'role_name = current_user'),
        ('datasets', 'id = ANY ((SELECT medsim.granted_datasets())::integer[])'),
        ('images', 'dataset_id = ANY ((SELECT medsim.granted_datasets())::integer[])'),
        ('embeddings', 'coalesce((SELECT true FROM medsim.images i WHERE i.id = image_id), false)'),
        ('embedding_queue', 'coalesce((SELECT true FROM medsim.images i WHERE i.id = image_id), false)'),
        ('calibrations', 'dataset IN (SELECT d.flag FROM medsim.datasets d)'),
        ('ingest_reports', 'dataset_id = ANY ((SELECT medsim.granted_datasets())::integer[])'),
        ('ingest_problems', 'coalesce((SELECT true FROM medsim.ingest_reports r WHERE r.id = report_id), false)'),
        ('pacs_sources', 'dataset_id = ANY ((SELECT medsim.granted_datasets())::integer[])'),
        ('audit_findings', 'coalesce((SELECT true FROM medsim.images a WHERE a.id = image_a), false) AND (image_b '
                           'IS NULL OR coalesce((SELECT true FROM medsim.images b WHERE b.id = image_b), false))'),
        -- summaries over every dataset (counts, per-dataset metrics, a gallery's size):
        -- only for a role that sees every dataset
        ('audits', 'false'), ('evaluations', 'false'), ('recall_reports', 'false'),
        ('index_builds', 'false'), ('deletions', 'false'),
        -- a model's epochs and its gallery's version move with archives a user may not see
        -- (the service checks a FAISS index's version on the owner's connection)
        ('training_epochs', 'false'), ('gallery_versions', 'false')
    ) AS t(tbl, rule) LOOP
        EXECUTE format('ALTER TABLE medsim.%I ENABLE ROW LEVEL SECURITY', p.tbl);
        EXECUTE format('DROP POLICY IF EXISTS granted ON medsim.%I', p.tbl);
        EXECUTE format('CREATE POLICY granted ON medsim.%I FOR SELECT USING (%s)', p.tbl,
                       CASE WHEN p.tbl = 'dataset_grants' THEN p.rule
                            ELSE '(SELECT medsim.sees_all_datasets()) OR (' || p.rule || ')' END);
    END LOOP;
END
$$;

-- Views run with the caller's rights, so the policies above apply through them
-- (a view's default is its owner's rights, which bypass RLS).
DO $$
DECLARE
    v record;
BEGIN
    FOR v IN SELECT viewname FROM pg_views WHERE schemaname = 'medsim' AND viewname <> 'model_catalog' LOOP
        EXECUTE format('ALTER VIEW medsim.%I SET (security_invoker = true)', v.viewname);
    END LOOP;
END
$$;

-- Models as a reader may see them: every model (a search needs its id, size and config),
-- but its training datasets and recipe's dataset list only as far as they are granted. The
-- view runs with its owner's rights (the reader has no SELECT on models.datasets), and
-- filters by the caller's own grants: granted_datasets() runs as the caller. The owner
-- (and a superuser) sees the lists whole: training and evaluation read them here too.
CREATE OR REPLACE VIEW medsim.model_catalog WITH (security_invoker = false) AS
SELECT m.id, m.name, m.preset, m.mode, m.config, m.embedding_dim, m.checkpoint_sha256, m.best_epoch,
       m.best_val_loss, m.train_seconds, m.is_current, m.created_at, m.candidate, m.promote_when_ready,
       CASE WHEN w.whole THEN m.datasets
            ELSE ARRAY(SELECT f FROM unnest(m.datasets) f
                       WHERE f IN (SELECT d.flag FROM medsim.datasets d
                                   WHERE d.id = ANY (w.granted))) END AS datasets,
       CASE WHEN w.whole THEN m.train_config ELSE m.train_config - 'flags' END AS train_config
FROM medsim.models m
CROSS JOIN (SELECT medsim.sees_all_datasets()
                   OR pg_has_role(current_user, (SELECT c.relowner FROM pg_class c
                                                 WHERE c.oid = 'medsim.models'::regclass), 'USAGE') AS whole,
                   medsim.granted_datasets() AS granted) w;
GRANT SELECT ON medsim.model_catalog TO medsim_reader;

-- Users, tokens and the access log are the administrators' (the owner's) alone; a role
-- reads its own grants (the functions above need that).
REVOKE ALL ON medsim.users, medsim.tokens, medsim.access_log FROM medsim_reader;
GRANT SELECT ON medsim.dataset_grants TO medsim_reader;
GRANT EXECUTE ON FUNCTION medsim.sees_all_datasets(), medsim.granted_datasets() TO medsim_reader;

-- The access log is append-only, for every role including the owner: a correction is a
-- new row. A retention purge is a deliberate act of the owner's (docs/operations.md):
-- ALTER TABLE medsim.access_log DISABLE TRIGGER USER, the DELETE, then ENABLE again.
CREATE OR REPLACE FUNCTION medsim.refuse_log_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'medsim.access_log is append-only: % is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE OR REPLACE TRIGGER append_only BEFORE UPDATE OR DELETE ON medsim.access_log
    FOR EACH ROW EXECUTE FUNCTION medsim.refuse_log_change();
CREATE OR REPLACE TRIGGER append_only_truncate BEFORE TRUNCATE ON medsim.access_log
    FOR EACH STATEMENT EXECUTE FUNCTION medsim.refuse_log_change();
