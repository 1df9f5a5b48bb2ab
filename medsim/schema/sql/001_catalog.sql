-- Idempotent objects over datasets/images. Applied at head by medsim/schema/env.py; safe to re-run.

-- The names of an image's labels, as an array: one name for single-label datasets, the
-- names of the positive classes for multi-label ones (empty when none is positive); a
-- label the dataset has no name for is its number. An array, never a joined string to be
-- split again: BreastMNIST's label is itself "normal, benign".
CREATE OR REPLACE FUNCTION medsim.label_names(p_dataset_id integer, p_labels smallint[])
RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN d.task LIKE 'multi-label%' THEN
            ARRAY(SELECT coalesce(d.label_names ->> (i - 1)::text, (i - 1)::text)
                  FROM generate_subscripts(p_labels, 1) AS i
                  WHERE p_labels[i] = 1 ORDER BY i)
        ELSE ARRAY[coalesce(d.label_names ->> p_labels[1]::text, p_labels[1]::text)]
    END
    FROM medsim.datasets d
    WHERE d.id = p_dataset_id
$$;

-- Human-readable label of an image, for display: the class name for single-label
-- subsets, the comma-joined names of the positive classes for multi-label ones.
CREATE OR REPLACE FUNCTION medsim.label_name(p_dataset_id integer, p_labels smallint[])
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(array_to_string(medsim.label_names(p_dataset_id, p_labels), ', '), ''), 'none')
$$;
