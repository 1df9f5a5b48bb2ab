-- Views FAISS builds read from, and that people query by hand.

-- Every stored embedding with its image's metadata (all models, all splits).
CREATE OR REPLACE VIEW medsim.embedded_images AS
SELECT e.model_id,
       e.image_id,
       d.flag AS dataset,
       i.split,
       i.split_index,
       i.labels,
       medsim.label_name(i.dataset_id, i.labels) AS label_name,
       medsim.label_names(i.dataset_id, i.labels) AS label_names,
       i.patient_key,
       i.study_id,
       i.metadata,
       e.embedding
FROM medsim.embeddings e
JOIN medsim.images i ON i.id = e.image_id
JOIN medsim.datasets d ON d.id = i.dataset_id;

-- What similar-image search returns by default: every split (medsim.search.GALLERY_SPLITS).
-- A search for the literature's protocol names its splits (search_gallery's p_splits).
CREATE OR REPLACE VIEW medsim.gallery AS
SELECT * FROM medsim.embedded_images WHERE split IN ('train', 'val', 'test');

-- What recall is measured with: the held-out test images.
CREATE OR REPLACE VIEW medsim.query_images AS
SELECT * FROM medsim.embedded_images WHERE split = 'test';

-- A filter value, a string or an array of strings -> text[].
CREATE OR REPLACE FUNCTION medsim.filter_values(p_value jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY(SELECT jsonb_array_elements_text(
        CASE jsonb_typeof(p_value) WHEN 'array' THEN p_value ELSE jsonb_build_array(p_value) END))
$$;

-- Signatures this file replaced (CREATE OR REPLACE cannot change a function's arguments).
DROP FUNCTION IF EXISTS medsim.gallery_match(text, text, text, jsonb, text, jsonb, text);

-- Whether a gallery row passes a search filter: {"dataset": ..., "split": ..., "label": ...,
-- any metadata key: value}; each value a string or an array of strings (any of them).
-- "modality" means the DICOM Modality kept in metadata, else a manifest's own "modality". A label matches an image when it
-- is one of its label names (an array: a name may itself hold ", "). The patient, when
-- given, is excluded. Plain SQL, so the planner inlines it into the search query.
CREATE OR REPLACE FUNCTION medsim.gallery_match(
    p_dataset text, p_split text, p_label_names text[], p_metadata jsonb, p_patient_key text,
    p_filter jsonb, p_exclude_patient text)
RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_exclude_patient IS NULL OR p_patient_key IS DISTINCT FROM p_exclude_patient)
       AND NOT EXISTS (
           SELECT 1 FROM jsonb_each(coalesce(p_filter, '{}')) f(key, value)
           WHERE NOT (
               -- coalesce: a key the image lacks is a mismatch, not a NULL that passes
               CASE f.key
                   WHEN 'label' THEN coalesce(p_label_names && medsim.filter_values(f.value), false)
                   ELSE coalesce(CASE f.key
                                     WHEN 'dataset' THEN p_dataset
                                     WHEN 'split' THEN p_split
                                     WHEN 'modality' THEN coalesce(p_metadata ->> 'Modality', p_metadata ->> 'modality')
                                     ELSE p_metadata ->> f.key
                                 END = ANY(medsim.filter_values(f.value)), false)
               END
           ))
$$;

-- Leakage, live from the data: images stored more than once (same pixels), with splits,
-- and whether the copies carry different labels (a finding of its own: the same picture
-- cannot be two diagnoses).
CREATE OR REPLACE VIEW medsim.exact_duplicates AS
SELECT i.sha256, count(*) AS copies, array_agg(i.id ORDER BY i.id) AS image_ids,
       array_agg(DISTINCT i.split) AS splits, array_agg(DISTINCT d.flag) AS datasets,
       count(DISTINCT i.split) > 1 AS across_splits,
       count(DISTINCT medsim.label_names(i.dataset_id, i.labels)) > 1 AS labels_differ
FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
GROUP BY i.sha256 HAVING count(*) > 1;

-- Patients whose images sit in more than one split.
CREATE OR REPLACE VIEW medsim.patients_in_two_splits AS
SELECT patient_key, array_agg(DISTINCT split) AS splits, count(*) AS images
FROM medsim.images WHERE patient_key IS NOT NULL
GROUP BY patient_key HAVING count(DISTINCT split) > 1;

-- The latest audit's findings per model (near duplicates need a model's embeddings).
CREATE OR REPLACE VIEW medsim.leakage AS
SELECT a.model_id, a.id AS audit_id, a.threshold, f.kind, f.image_a, f.image_b, f.split_a, f.split_b,
       f.distance, f.split_a <> f.split_b AS across_splits, f.labels_differ, f.correlation
FROM medsim.audit_findings f
JOIN medsim.audits a ON a.id = f.audit_id
WHERE a.id = (SELECT max(a2.id) FROM medsim.audits a2 WHERE a2.model_id IS NOT DISTINCT FROM a.model_id);
