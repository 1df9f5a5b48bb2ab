-- Idempotent objects over datasets/images. Applied by Alembic revisions; safe to re-run.

-- Human-readable label of an image: the class name for single-label subsets,
-- the comma-joined names of the positive classes for multi-label ones.
CREATE OR REPLACE FUNCTION medsim.label_name(p_dataset_id integer, p_labels smallint[])
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN d.task LIKE 'multi-label%' THEN
            coalesce((SELECT string_agg(d.label_names ->> (i - 1)::text, ', ' ORDER BY i)
                      FROM generate_subscripts(p_labels, 1) AS i
                      WHERE p_labels[i] = 1), 'none')
        ELSE d.label_names ->> p_labels[1]::text
    END
    FROM medsim.datasets d
    WHERE d.id = p_dataset_id
$$;
