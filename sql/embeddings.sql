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

-- Per model and dataset: how much is embedded, pending, failed. "pending" counts every
-- image without an embedding that has not failed for good, queued or not yet queued.
CREATE OR REPLACE VIEW medsim.embedding_status AS
SELECT m.id AS model_id,
       m.name AS model_name,
       m.is_current,
       d.flag AS dataset,
       count(*) AS total,
       count(e.image_id) AS embedded,
       count(*) FILTER (WHERE e.image_id IS NULL AND q.failed_at IS NULL) AS pending,
       count(q.failed_at) AS failed,
       min(coalesce(q.enqueued_at, i.created_at))
           FILTER (WHERE e.image_id IS NULL AND q.failed_at IS NULL) AS oldest_pending
FROM medsim.models m
CROSS JOIN medsim.images i
JOIN medsim.datasets d ON d.id = i.dataset_id
LEFT JOIN medsim.embeddings e ON e.model_id = m.id AND e.image_id = i.id
LEFT JOIN medsim.embedding_queue q ON q.model_id = m.id AND q.image_id = i.id
GROUP BY m.id, m.name, m.is_current, d.flag;
