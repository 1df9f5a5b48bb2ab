-- Idempotent objects over embeddings and the embedding queue.

-- The untyped vector column accepts any dimension; this keeps each model's rows at
-- its registered dimension so a bad writer cannot mix them. Statement-level with a
-- transition table: one check per COPY/INSERT, not one lookup per row.
CREATE OR REPLACE FUNCTION medsim.check_embedding_dim() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.model_id, vector_dims(n.embedding) AS got, m.embedding_dim AS expected INTO bad
    FROM new_embeddings n LEFT JOIN medsim.models m ON m.id = n.model_id
    WHERE m.embedding_dim IS DISTINCT FROM vector_dims(n.embedding)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'embedding for model % has % dimensions, the model has %',
            bad.model_id, bad.got, bad.expected
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

-- New images wake sleeping workers, which queue them for their model (Q.enqueue_model).
-- No transition table: capturing every new row (pixels included) cost COPY 10%.
CREATE OR REPLACE FUNCTION medsim.notify_new_images() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('medsim_images', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER embeddings_check_dim_insert AFTER INSERT ON medsim.embeddings
REFERENCING NEW TABLE AS new_embeddings
FOR EACH STATEMENT EXECUTE FUNCTION medsim.check_embedding_dim();

CREATE OR REPLACE TRIGGER embeddings_check_dim_update AFTER UPDATE ON medsim.embeddings
REFERENCING NEW TABLE AS new_embeddings
FOR EACH STATEMENT EXECUTE FUNCTION medsim.check_embedding_dim();

CREATE OR REPLACE TRIGGER images_notify AFTER INSERT ON medsim.images
FOR EACH STATEMENT EXECUTE FUNCTION medsim.notify_new_images();

-- The gallery version (medsim.gallery_versions, revision 0011): one bump per statement
-- and model that changes the model's embeddings, so "is this FAISS index still fresh" is
-- one primary-key lookup instead of a hash over every vector. Statement-level with
-- transition tables, like the dimension check: a 100,000-row COPY is one upsert.
-- The upsert holds the model's row until commit: concurrent workers of one model queue
-- on it only between their COPY and their commit.
CREATE OR REPLACE FUNCTION medsim.bump_gallery_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO medsim.gallery_versions AS g (model_id)
        SELECT DISTINCT model_id FROM old_embeddings
        ON CONFLICT (model_id) DO UPDATE SET version = g.version + 1, changed_at = now();
    ELSE
        INSERT INTO medsim.gallery_versions AS g (model_id)
        SELECT DISTINCT model_id FROM new_embeddings
        ON CONFLICT (model_id) DO UPDATE SET version = g.version + 1, changed_at = now();
    END IF;
    RETURN NULL;
END
$$;

-- An image moving into or out of the gallery splits changes every model's gallery.
CREATE OR REPLACE FUNCTION medsim.bump_all_gallery_versions() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE medsim.gallery_versions SET version = version + 1, changed_at = now();
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER embeddings_version_insert AFTER INSERT ON medsim.embeddings
REFERENCING NEW TABLE AS new_embeddings
FOR EACH STATEMENT EXECUTE FUNCTION medsim.bump_gallery_version();

CREATE OR REPLACE TRIGGER embeddings_version_update AFTER UPDATE ON medsim.embeddings
REFERENCING NEW TABLE AS new_embeddings
FOR EACH STATEMENT EXECUTE FUNCTION medsim.bump_gallery_version();

-- also fires for the rows an image deletion cascades to
CREATE OR REPLACE TRIGGER embeddings_version_delete AFTER DELETE ON medsim.embeddings
REFERENCING OLD TABLE AS old_embeddings
FOR EACH STATEMENT EXECUTE FUNCTION medsim.bump_gallery_version();

CREATE OR REPLACE TRIGGER images_split_version AFTER UPDATE OF split ON medsim.images
FOR EACH STATEMENT EXECUTE FUNCTION medsim.bump_all_gallery_versions();

-- Per model and dataset: how much is embedded, pending, failed. "pending" counts every
-- image without an embedding that has not failed for good, queued or not yet queued.
--
-- Built from per-model aggregates, never from models x images: each model's embeddings
-- and queue rows are counted once (one pass over embeddings, one over the queue), and
-- the images per dataset once, shared by every model. The one anti-join left runs only
-- for a (model, dataset) with images that are neither embedded nor queued (a model no
-- worker serves, or images newer than its last enqueue), to date the oldest of them; it
-- walks the dataset's images in id order and stops at the first one.
CREATE OR REPLACE VIEW medsim.embedding_status AS
WITH per_dataset AS (
    SELECT dataset_id, count(*) AS total FROM medsim.images GROUP BY dataset_id
), embedded AS (
    SELECT e.model_id, i.dataset_id, count(*) AS n
    FROM medsim.embeddings e JOIN medsim.images i ON i.id = e.image_id
    GROUP BY 1, 2
), queued AS (
    -- queue rows whose image has no embedding (a stale row for an embedded image is
    -- dropped by the next worker; it must not count twice meanwhile)
    SELECT q.model_id, i.dataset_id,
           count(*) FILTER (WHERE q.failed_at IS NULL) AS waiting,
           count(*) FILTER (WHERE q.failed_at IS NOT NULL) AS failed,
           min(q.enqueued_at) FILTER (WHERE q.failed_at IS NULL) AS oldest_waiting
    FROM medsim.embedding_queue q JOIN medsim.images i ON i.id = q.image_id
    WHERE NOT EXISTS (SELECT 1 FROM medsim.embeddings e
                      WHERE e.model_id = q.model_id AND e.image_id = q.image_id)
    GROUP BY 1, 2
), counts AS (
    SELECT m.id AS model_id, m.name AS model_name, m.is_current, d.id AS dataset_id,
           d.flag AS dataset, p.total,
           coalesce(e.n, 0) AS embedded,
           p.total - coalesce(e.n, 0) - coalesce(q.failed, 0) AS pending,
           coalesce(q.failed, 0) AS failed,
           p.total - coalesce(e.n, 0) - coalesce(q.failed, 0) - coalesce(q.waiting, 0) AS unqueued,
           q.oldest_waiting
    FROM medsim.models m
    CROSS JOIN medsim.datasets d
    JOIN per_dataset p ON p.dataset_id = d.id
    LEFT JOIN embedded e ON e.model_id = m.id AND e.dataset_id = d.id
    LEFT JOIN queued q ON q.model_id = m.id AND q.dataset_id = d.id
)
SELECT c.model_id, c.model_name, c.is_current, c.dataset, c.total, c.embedded, c.pending,
       c.failed,
       CASE WHEN c.unqueued > 0 THEN
           least(c.oldest_waiting,
                 (SELECT i.created_at FROM medsim.images i
                  WHERE i.dataset_id = c.dataset_id
                    AND NOT EXISTS (SELECT 1 FROM medsim.embeddings e
                                    WHERE e.model_id = c.model_id AND e.image_id = i.id)
                    AND NOT EXISTS (SELECT 1 FROM medsim.embedding_queue q
                                    WHERE q.model_id = c.model_id AND q.image_id = i.id)
                  ORDER BY i.id LIMIT 1))
       ELSE c.oldest_waiting END AS oldest_pending
FROM counts c;
