-- The SQL surface for people: current embeddings, similar-image functions, a reader role.

-- Embeddings of the current model with image metadata.
CREATE OR REPLACE VIEW medsim.current_embeddings AS
SELECT ei.*
FROM medsim.embedded_images ei
JOIN medsim.models m ON m.id = ei.model_id AND m.is_current;

-- k nearest gallery (train + val) images to a given vector, for a model (default: the
-- current one), optionally within one dataset. Dynamic SQL so the planner sees the
-- model id and dimension as constants and uses the model's partial HNSW index; run
-- with `SET hnsw.iterative_scan = strict_order` when filtering by dataset.
CREATE OR REPLACE FUNCTION medsim.search_by_vector(
    p_query vector, p_k integer DEFAULT 4, p_model_id integer DEFAULT NULL,
    p_dataset text DEFAULT NULL, p_exclude_image_id bigint DEFAULT NULL)
RETURNS TABLE (image_id bigint, dataset text, split text, label_name text, distance double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_model integer := coalesce(p_model_id, (SELECT id FROM medsim.models WHERE is_current));
    v_dim integer;
BEGIN
    -- bounded before any work: k = NULL used to return the whole gallery, and k = 3e9
    -- ended in an integer overflow deep inside the query
    IF p_k IS NULL OR p_k < 1 OR p_k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, got %', coalesce(p_k::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_query IS NULL THEN
        RAISE EXCEPTION 'the query vector is NULL (an image without an embedding for this model?)'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT embedding_dim INTO v_dim FROM medsim.models WHERE id = v_model;
    IF v_dim IS NULL THEN
        RAISE EXCEPTION 'no such model (id %), and no current model', p_model_id;
    END IF;
    IF vector_dims(p_query) <> v_dim THEN
        RAISE EXCEPTION 'query has % dimensions, model % has %', vector_dims(p_query), v_model, v_dim;
    END IF;
    -- medsim.gallery is a plain view over medsim.embeddings: the planner flattens it, so
    -- the cast below is the partial HNSW index's own expression and the index is used
    RETURN QUERY EXECUTE format(
        'SELECT g.image_id, g.dataset, g.split, g.label_name,
                (g.embedding::vector(%1$s) <-> $1::vector(%1$s))::double precision
         FROM medsim.gallery g
         WHERE g.model_id = %2$s
           AND ($2::text IS NULL OR g.dataset = $2) AND ($3::bigint IS NULL OR g.image_id <> $3)
         ORDER BY g.embedding::vector(%1$s) <-> $1::vector(%1$s)
         LIMIT $4', v_dim, v_model)
    USING p_query, p_dataset, p_exclude_image_id, p_k;
END
$$;

-- k most similar gallery images to a stored image (never the image itself).
CREATE OR REPLACE FUNCTION medsim.similar_images(
    p_image_id bigint, p_k integer DEFAULT 4, p_model_id integer DEFAULT NULL,
    p_dataset text DEFAULT NULL)
RETURNS TABLE (image_id bigint, dataset text, split text, label_name text, distance double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_model integer := coalesce(p_model_id, (SELECT id FROM medsim.models WHERE is_current));
    v_query vector;
BEGIN
    SELECT e.embedding INTO v_query FROM medsim.embeddings e
    WHERE e.model_id = v_model AND e.image_id = p_image_id;
    IF v_query IS NULL THEN
        RAISE EXCEPTION 'image % has no embedding for model % (unknown image, or not embedded yet)',
            p_image_id, v_model;
    END IF;
    RETURN QUERY SELECT * FROM medsim.search_by_vector(v_query, p_k, v_model, p_dataset, p_image_id);
END
$$;

-- Read-only access for analysts: SELECT and the functions above, nothing else.
-- Roles are cluster-wide, so create it only if another database has not already.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'medsim_reader') THEN
        CREATE ROLE medsim_reader NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA medsim TO medsim_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA medsim TO medsim_reader;
-- What a read-only analyst does not get: model checkpoint bytes (the weights), image
-- pixels, and file paths on the server (where source files and FAISS indexes live).
-- Table-level SELECT is replaced by the columns below; a column added by a later
-- revision stays unreadable until it is listed here. The views expose none of the three.
REVOKE SELECT ON medsim.models, medsim.images, medsim.datasets, medsim.index_builds,
                 medsim.ingest_problems FROM medsim_reader;
GRANT SELECT (id, name, preset, mode, config, train_config, datasets, embedding_dim, checkpoint_sha256,
              best_epoch, best_val_loss, train_seconds, is_current, created_at)
    ON medsim.models TO medsim_reader;
GRANT SELECT (id, dataset_id, split, split_index, labels, height, width, channels, sha256, created_at,
              bit_depth, patient_key, study_id, metadata, original_height, original_width)
    ON medsim.images TO medsim_reader;
GRANT SELECT (id, flag, image_size, is_medmnist, python_class, description, task, n_channels, label_names,
              n_samples, license, url, source_md5, official_md5, md5_official, ingested_at, source_kind,
              split_method)
    ON medsim.datasets TO medsim_reader;
GRANT SELECT (report_id, kind, reason) ON medsim.ingest_problems TO medsim_reader;
GRANT SELECT (id, model_id, kind, params, source_view, splits, dim, metric, n_rows, fingerprint,
              build_seconds, created_at, file_sha256, file_bytes)
    ON medsim.index_builds TO medsim_reader;
GRANT EXECUTE ON FUNCTION medsim.search_by_vector(vector, integer, integer, text, bigint),
                          medsim.similar_images(bigint, integer, integer, text),
                          medsim.label_name(integer, smallint[]) TO medsim_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA medsim GRANT SELECT ON TABLES TO medsim_reader;
-- A query that runs away is cancelled; it applies to sessions that log in as (or SET ROLE
-- to) medsim_reader. Per-person logins set their own: ALTER ROLE alice SET statement_timeout.
ALTER ROLE medsim_reader SET statement_timeout = '30s';
