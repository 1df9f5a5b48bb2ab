-- The SQL surface for people: current embeddings, similar-image functions, a reader role.

-- Embeddings of the current model with image metadata.
CREATE OR REPLACE VIEW medsim.current_embeddings AS
SELECT ei.*
FROM medsim.embedded_images ei
JOIN medsim.models m ON m.id = ei.model_id AND m.is_current;

-- Signatures this file replaced (CREATE OR REPLACE cannot change a function's arguments
-- or its result columns).
DROP FUNCTION IF EXISTS medsim.similar_images(bigint, integer, integer, text);
DROP FUNCTION IF EXISTS medsim.similar_images(bigint, integer, integer, text, jsonb, boolean, integer);
DROP FUNCTION IF EXISTS medsim.search_gallery(vector, integer, integer, jsonb, text, bigint, integer);

-- The k nearest gallery images to a vector (the gallery: the splits in p_splits, every
-- split by default, as medsim.gallery), for a model (default: the
-- current one), passing a filter (medsim.gallery_match: dataset, split, label, any
-- metadata key), without one patient (p_exclude_patient, a patient_key) or one image, and
-- with at most p_per_patient images per patient (images without a patient count alone).
--
-- Dynamic SQL so the planner sees the model id and dimension as constants and uses the
-- model's partial HNSW index, with strict iterative scans so a filter does not starve
-- the result. An HNSW scan can still stop early (hnsw.max_scan_tuples) when the filter
-- matches few rows: then the same query runs exact, so fewer than k rows come back only
-- when fewer than k exist. The settings changed here are restored before returning.
CREATE OR REPLACE FUNCTION medsim.search_gallery(
    p_query vector, p_k integer DEFAULT 4, p_model_id integer DEFAULT NULL,
    p_filter jsonb DEFAULT '{}', p_exclude_patient text DEFAULT NULL,
    p_exclude_image_id bigint DEFAULT NULL, p_per_patient integer DEFAULT NULL,
    p_splits text[] DEFAULT ARRAY['train', 'val', 'test'])
RETURNS TABLE (image_id bigint, dataset text, split text, label_name text, distance double precision,
               patient_key text, study_id text, label_names text[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_model integer := coalesce(p_model_id, (SELECT id FROM medsim.models WHERE is_current));
    v_dim integer;
    v_limit integer;
    v_exact boolean := false;
    v_rows jsonb;
    v_found integer;
    v_candidates integer;
    v_old_scan text := current_setting('hnsw.iterative_scan', true);
    v_old_index text := current_setting('enable_indexscan');
    v_sql text;
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
    IF p_per_patient IS NOT NULL AND p_per_patient < 1 THEN
        RAISE EXCEPTION 'per_patient must be at least 1, got %', p_per_patient
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_splits IS NULL OR cardinality(p_splits) = 0
       OR NOT p_splits <@ ARRAY['train', 'val', 'test'] THEN
        RAISE EXCEPTION 'p_splits must be some of train, val, test, got %', coalesce(p_splits::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(coalesce(p_filter, '{}')) <> 'object' THEN
        RAISE EXCEPTION 'the filter must be a JSON object like {"dataset": "x", "label": ["a", "b"]}'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT embedding_dim INTO v_dim FROM medsim.models WHERE id = v_model;
    IF v_dim IS NULL THEN
        RAISE EXCEPTION 'no such model (id %), and no current model', p_model_id;
    END IF;
    IF vector_dims(p_query) <> v_dim THEN
        RAISE EXCEPTION 'query has % dimensions, model % has %', vector_dims(p_query), v_model, v_dim;
    END IF;
    -- medsim.embedded_images is a plain view over medsim.embeddings: the planner flattens
    -- it, so the cast below is the partial HNSW index's own expression and the index is used
    v_sql := format(
        'WITH cand AS (
             SELECT g.image_id, g.dataset, g.split, g.label_name, g.label_names, g.patient_key, g.study_id,
                    (g.embedding::%3$s(%1$s) <-> $1::%3$s(%1$s))::double precision AS distance
             FROM medsim.embedded_images g
             WHERE g.model_id = %2$s AND g.split = ANY($8)
               AND ($4::bigint IS NULL OR g.image_id <> $4)
               AND medsim.gallery_match(g.dataset, g.split, g.label_names, g.metadata, g.patient_key, $2, $3)
             ORDER BY g.embedding::%3$s(%1$s) <-> $1::%3$s(%1$s)
             LIMIT $5),
         ranked AS (
             SELECT c.*, row_number() OVER (PARTITION BY coalesce(c.patient_key, c.image_id::text)
                                            ORDER BY c.distance) AS nth
             FROM cand c),
         kept AS (
             SELECT * FROM ranked WHERE $6::int IS NULL OR nth <= $6 ORDER BY distance LIMIT $7)
         SELECT (SELECT count(*) FROM cand)::int,
                coalesce((SELECT jsonb_agg(to_jsonb(k) - ''nth'' ORDER BY k.distance) FROM kept k), ''[]'')',
        v_dim, v_model,
        -- above 2,000 dimensions (an imported encoder's) the HNSW index is on halfvec, which
        -- pgvector indexes up to 4,000 (search/pgvector_hnsw.py's distance_expr)
        CASE WHEN v_dim > 2000 THEN 'halfvec' ELSE 'vector' END);
    v_limit := CASE WHEN p_per_patient IS NULL THEN p_k ELSE p_k * 4 END;
    PERFORM set_config('hnsw.iterative_scan', 'strict_order', true);
    LOOP
        EXECUTE v_sql INTO v_candidates, v_rows
            USING p_query, coalesce(p_filter, '{}'::jsonb), p_exclude_patient, p_exclude_image_id,
                  v_limit, p_per_patient, p_k, p_splits;
        v_found := jsonb_array_length(v_rows);
        EXIT WHEN v_found >= p_k;
        IF v_candidates >= v_limit THEN  -- grouping used some up: look further
            v_limit := v_limit * 4;
            CONTINUE;
        END IF;
        EXIT WHEN v_exact;  -- an exact scan ran out: fewer than k exist
        v_exact := true;  -- the HNSW scan stopped early: the same query, exact
        PERFORM set_config('enable_indexscan', 'off', true);
    END LOOP;
    PERFORM set_config('enable_indexscan', v_old_index, true);
    PERFORM set_config('hnsw.iterative_scan', coalesce(v_old_scan, 'off'), true);
    RETURN QUERY SELECT r.image_id, r.dataset, r.split, r.label_name, r.distance, r.patient_key, r.study_id,
                        r.label_names
                 FROM jsonb_to_recordset(v_rows) AS r(image_id bigint, dataset text, split text,
                      label_name text, distance double precision, patient_key text, study_id text,
                      label_names text[]);
END
$$;

-- k nearest gallery images to a vector, optionally within one dataset (the first SQL
-- surface; search_gallery has every option).
CREATE OR REPLACE FUNCTION medsim.search_by_vector(
    p_query vector, p_k integer DEFAULT 4, p_model_id integer DEFAULT NULL,
    p_dataset text DEFAULT NULL, p_exclude_image_id bigint DEFAULT NULL)
RETURNS TABLE (image_id bigint, dataset text, split text, label_name text, distance double precision)
LANGUAGE sql STABLE AS $$
    SELECT s.image_id, s.dataset, s.split, s.label_name, s.distance
    FROM medsim.search_gallery(p_query, p_k, p_model_id,
                               CASE WHEN p_dataset IS NULL THEN '{}'::jsonb
                                    ELSE jsonb_build_object('dataset', p_dataset) END,
                               NULL, p_exclude_image_id) s
$$;

-- k most similar gallery images to a stored image: never the image itself, and by default
-- never another image of its patient (the honest default: a patient's other images are
-- not what a similar-case search is for, and they flatter retrieval figures).
CREATE OR REPLACE FUNCTION medsim.similar_images(
    p_image_id bigint, p_k integer DEFAULT 4, p_model_id integer DEFAULT NULL,
    p_dataset text DEFAULT NULL, p_filter jsonb DEFAULT '{}', p_include_own_patient boolean DEFAULT false,
    p_per_patient integer DEFAULT NULL)
RETURNS TABLE (image_id bigint, dataset text, split text, label_name text, distance double precision,
               patient_key text, study_id text, label_names text[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_model integer := coalesce(p_model_id, (SELECT id FROM medsim.models WHERE is_current));
    v_query vector;
    v_patient text;
BEGIN
    SELECT e.embedding, i.patient_key INTO v_query, v_patient
    FROM medsim.embeddings e JOIN medsim.images i ON i.id = e.image_id
    WHERE e.model_id = v_model AND e.image_id = p_image_id;
    IF v_query IS NULL THEN
        RAISE EXCEPTION 'image % has no embedding for model % (unknown image, or not embedded yet)',
            p_image_id, v_model;
    END IF;
    RETURN QUERY SELECT * FROM medsim.search_gallery(
        v_query, p_k, v_model,
        coalesce(p_filter, '{}') || CASE WHEN p_dataset IS NULL THEN '{}'::jsonb
                                         ELSE jsonb_build_object('dataset', p_dataset) END,
        CASE WHEN p_include_own_patient THEN NULL ELSE v_patient END, p_image_id, p_per_patient);
END
$$;

-- The probability that a neighbour at this distance shares the query's diagnosis, from
-- the model's calibration for the dataset (medsim evaluate fits it on validation pairs);
-- NULL when none is stored. For example:
--   SELECT s.*, medsim.p_same_label(NULL, s.dataset, s.distance) FROM medsim.similar_images(3000, 5) s;
CREATE OR REPLACE FUNCTION medsim.p_same_label(p_model_id integer, p_dataset text, p_distance double precision)
RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT 1 / (1 + exp(least(700, -(c.a + c.b * p_distance))))  -- least: exp() overflows past 709
    FROM medsim.calibrations c
    WHERE c.model_id = coalesce(p_model_id, (SELECT id FROM medsim.models WHERE is_current))
      AND c.dataset = p_dataset
$$;

-- Read-only access for analysts: SELECT and the functions above, nothing else. The role
-- itself is made by 000_roles.sql (roles are cluster-wide: a restore into a fresh server
-- needs it before the dump's grants).
GRANT USAGE ON SCHEMA medsim TO medsim_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA medsim TO medsim_reader;
-- What a read-only analyst does not get: model checkpoint bytes (the weights), image
-- pixels, and file paths on the server (where source files and FAISS indexes live).
-- Table-level SELECT is replaced by the columns below; a column added by a later
-- revision stays unreadable until it is listed here. The views expose none of the three.
REVOKE SELECT ON medsim.models, medsim.images, medsim.datasets, medsim.index_builds,
                 medsim.ingest_problems, medsim.ingest_reports, medsim.pseudonym_keys,
                 medsim.uploads, medsim.pacs_instances,
                 medsim.source_files FROM medsim_reader;
-- A model's training datasets name archives a user may not be granted: readers get them
-- through medsim.model_catalog (005_access.sql), which shows only the granted ones.
GRANT SELECT (id, name, preset, mode, config, embedding_dim, checkpoint_sha256,
              best_epoch, best_val_loss, train_seconds, is_current, created_at, candidate, promote_when_ready)
    ON medsim.models TO medsim_reader;
-- phash (revision 0021): a search by file looks for the stored picture at another size
-- with the user's own rights, as it does for the same pixels by sha256
GRANT SELECT (id, dataset_id, split, split_index, labels, height, width, channels, sha256, created_at,
              bit_depth, patient_key, study_id, metadata, original_height, original_width, phash)
    ON medsim.images TO medsim_reader;
GRANT SELECT (id, flag, image_size, is_medmnist, python_class, description, task, n_channels, label_names,
              n_samples, license, url, source_md5, official_md5, md5_official, ingested_at, source_kind,
              split_method)
    ON medsim.datasets TO medsim_reader;
GRANT SELECT (report_id, kind, reason) ON medsim.ingest_problems TO medsim_reader;
GRANT SELECT (id, dataset_id, options, status, added, duplicates, skipped, label_changes, relabelled,
              label_conflicts, started_at, finished_at)
    ON medsim.ingest_reports TO medsim_reader;
GRANT SELECT (id, model_id, kind, params, source_view, splits, dim, metric, n_rows, fingerprint,
              build_seconds, created_at, file_sha256, file_bytes, gallery_version)
    ON medsim.index_builds TO medsim_reader;
GRANT EXECUTE ON FUNCTION medsim.search_by_vector(vector, integer, integer, text, bigint),
                          medsim.search_gallery(vector, integer, integer, jsonb, text, bigint, integer, text[]),
                          medsim.similar_images(bigint, integer, integer, text, jsonb, boolean, integer),
                          medsim.gallery_match(text, text, text[], jsonb, text, jsonb, text),
                          medsim.filter_values(jsonb),
                          medsim.label_name(integer, smallint[]),
                          medsim.label_names(integer, smallint[]),
                          medsim.p_same_label(integer, text, double precision) TO medsim_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA medsim GRANT SELECT ON TABLES TO medsim_reader;
