-- Runtime SQL for medsim, one query per `-- name:` header, parameterised with
-- %(name)s. Identifiers that vary (per-model index names, vector(N) casts) are
-- composed with psycopg.sql by the caller, never formatted into these strings.

-- ===================================================================== ingest

-- name: dataset_by_flag
SELECT d.id, d.source_md5, (SELECT count(*) FROM medsim.images i WHERE i.dataset_id = d.id) AS n_images
FROM medsim.datasets d
WHERE d.flag = %(flag)s AND d.image_size = %(size)s;

-- name: insert_dataset
INSERT INTO medsim.datasets (flag, image_size, python_class, description, task, n_channels,
                             label_names, n_samples, license, url, source_file, source_md5,
                             official_md5, md5_official)
VALUES (%(flag)s, %(size)s, %(python_class)s, %(description)s, %(task)s, %(n_channels)s,
        %(label_names)s, %(n_samples)s, %(license)s, %(url)s, %(source_file)s, %(source_md5)s,
        %(official_md5)s, %(md5_official)s)
RETURNING id;

-- name: copy_images
COPY medsim.images (dataset_id, split, split_index, labels, height, width, channels, pixels, sha256, phash)
FROM STDIN WITH (FORMAT BINARY);

-- name: dataset_summary
SELECT d.flag, d.image_size, d.md5_official, i.split, count(*) AS n
FROM medsim.datasets d JOIN medsim.images i ON i.dataset_id = d.id
WHERE d.flag = ANY(%(flags)s) AND d.image_size = %(size)s
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, array_position(ARRAY['train', 'val', 'test'], i.split);

-- ===================================================================== archives (folders, DICOM)

-- name: archive_datasets_named
-- An archive is found by its name alone (its image_size column holds the --max-side it was
-- ingested with); a MedMNIST dataset of that name is reported so the ingest can refuse.
SELECT id, source_kind, label_names, task, image_size FROM medsim.datasets
WHERE flag = %(flag)s ORDER BY (source_kind = 'medmnist') DESC, id;

-- name: insert_archive_dataset
-- image_size is the longest side allowed at ingest (images keep their own sizes);
-- n_channels is nominal (each image records its own); n_samples is filled at the end.
-- Two ingests creating the same dataset at once: one inserts, the other finds it.
INSERT INTO medsim.datasets (flag, image_size, is_medmnist, task, n_channels, label_names, n_samples,
                             source_file, source_md5, md5_official, source_kind, split_method)
VALUES (%(flag)s, %(size)s, false, %(task)s, 1, %(label_names)s, '{}', %(source_file)s, %(source_md5)s,
        false, %(source_kind)s, %(split_method)s)
ON CONFLICT (flag, image_size) DO NOTHING
RETURNING id;

-- name: update_label_names
UPDATE medsim.datasets SET label_names = %(label_names)s WHERE id = %(id)s;

-- name: set_split_method
UPDATE medsim.datasets SET split_method = %(split_method)s WHERE id = %(id)s;

-- name: dataset_patients
-- The split each patient already in the dataset has (a returning patient keeps it).
SELECT DISTINCT ON (patient_key) patient_key, split FROM medsim.images
WHERE dataset_id = %(dataset_id)s AND patient_key IS NOT NULL;

-- name: lock_dataset
-- Each chunk of an archive ingest takes this first, and only then looks for its images:
-- ingests into one dataset take turns, so N runs of one folder at once store each image
-- once (each chunk sees what the others committed), and split indexes are read under it.
SELECT label_names FROM medsim.datasets WHERE id = %(id)s FOR UPDATE;

-- name: images_with_digests
SELECT id, sha256, labels FROM medsim.images WHERE dataset_id = %(dataset_id)s AND sha256 = ANY(%(digests)s);

-- name: max_split_index
SELECT split, max(split_index) FROM medsim.images WHERE dataset_id = %(dataset_id)s GROUP BY split;

-- name: copy_archive_images
COPY medsim.images (dataset_id, split, split_index, labels, height, width, channels, pixels, sha256,
                    bit_depth, patient_key, study_id, metadata, source_path, original_height, original_width,
                    phash)
FROM STDIN WITH (FORMAT BINARY);

-- name: relabel_image
UPDATE medsim.images SET labels = %(labels)s WHERE id = %(id)s;

-- name: insert_ingest_report
INSERT INTO medsim.ingest_reports (dataset_id, source, options) VALUES (%(dataset_id)s, %(source)s, %(options)s)
RETURNING id;

-- name: hold_ingest_report
-- A session lock for the life of the run: when the run dies, the lock goes with its session.
SELECT pg_advisory_lock(hashtext('medsim.ingest'), %(id)s);

-- name: release_ingest_report
SELECT pg_advisory_unlock(hashtext('medsim.ingest'), %(id)s);

-- name: interrupted_ingest_reports
-- A 'running' report whose lock anyone can take has no run any more (the transaction-level
-- lock taken to find out ends with this statement).
UPDATE medsim.ingest_reports SET status = 'interrupted', finished_at = now()
WHERE status = 'running' AND pg_try_advisory_xact_lock(hashtext('medsim.ingest'), id)
RETURNING id;

-- name: insert_ingest_problem
INSERT INTO medsim.ingest_problems (report_id, path, kind, reason)
VALUES (%(report_id)s, %(path)s, %(kind)s, %(reason)s);

-- name: finish_ingest_report
UPDATE medsim.ingest_reports
SET status = %(status)s, added = %(added)s, duplicates = %(duplicates)s, skipped = %(skipped)s,
    label_changes = %(label_changes)s, relabelled = %(relabelled)s, label_conflicts = %(label_conflicts)s,
    finished_at = now()
WHERE id = %(id)s;

-- name: update_n_samples
UPDATE medsim.datasets d
SET n_samples = coalesce((SELECT jsonb_object_agg(split, n) FROM
                            (SELECT split, count(*) AS n FROM medsim.images WHERE dataset_id = d.id
                             GROUP BY split) s), '{}')
WHERE d.id = %(id)s;

-- ===================================================================== pseudonym keys

-- name: record_key_fingerprints
-- The first key chain to hash anything here is this database's (one row, so two
-- concurrent first ingests agree on whichever committed first).
INSERT INTO medsim.pseudonym_keys (fingerprints) VALUES (%(fingerprints)s) ON CONFLICT DO NOTHING;

-- name: key_fingerprints
SELECT fingerprints FROM medsim.pseudonym_keys;

-- name: set_key_fingerprints
UPDATE medsim.pseudonym_keys SET fingerprints = %(fingerprints)s, rotated_at = now();

-- name: lock_key_fingerprints
-- A rotation holds the key row from its check to its commit: an ingest (which reads the
-- fingerprints first) waits, and then hashes with the new chain or is refused.
SELECT 1 FROM medsim.pseudonym_keys FOR UPDATE;

-- name: distinct_metadata_values
SELECT DISTINCT metadata ->> %(tag)s FROM medsim.images WHERE metadata ? %(tag)s;

-- name: rewrite_metadata_values
UPDATE medsim.images i SET metadata = jsonb_set(i.metadata, ARRAY[%(tag)s], to_jsonb(m.new))
FROM unnest(%(old)s::text[], %(new)s::text[]) AS m(old, new)
WHERE i.metadata ->> %(tag)s = m.old;

-- name: deleted_patients
SELECT DISTINCT target FROM medsim.deletions WHERE kind = 'patient';

-- name: rewrite_deleted_patients
UPDATE medsim.deletions d SET target = m.new
FROM unnest(%(old)s::text[], %(new)s::text[]) AS m(old, new)
WHERE d.kind = 'patient' AND d.target = m.old;

-- ===================================================================== deletion

-- name: images_of_dataset
SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id WHERE d.flag = %(name)s;

-- name: archive_dataset_exists
SELECT id FROM medsim.datasets WHERE flag = %(name)s LIMIT 1;

-- name: images_of_patient
SELECT id FROM medsim.images WHERE patient_key = %(patient_key)s;

-- name: lock_patient_exclusive
-- A deletion of a patient takes this first, before it looks for their images, and holds it
-- to commit; every chunk of an ingest or a sync holds the shared form (lock_patients_shared)
-- for the patients of the chunk while it checks their tombstones and stores.
-- Why: a sync listed a patient's instances, the deletion committed (640 images), and the
-- sync's next chunks stored 80 more of theirs 1.1 s later (issue 34). With the lock, a
-- chunk in flight commits before the deletion looks (the deletion then finds and deletes
-- what it stored), and a chunk that comes later waits for the deletion's commit and then
-- sees its tombstone (READ COMMITTED: the check is a new statement, a new snapshot).
-- Why an advisory lock: it is keyed by the patient, so it covers datasets a sync has not
-- created yet (a row lock needs a row), and PostgreSQL queues advisory requests fairly (a
-- shared request waits behind a queued exclusive one), so back-to-back chunks of several
-- ingests cannot starve a deletion as FOR SHARE row locks can. Any login can take an
-- advisory lock; one that held a stripe would stall the deletions of its patients and the
-- chunks holding their images, nothing else.
-- Why 64 stripes (the patient key's hash & 63) and not one lock per patient: a chunk of 500
-- images of 500 patients took 500 locks, and the server's lock table is shared by every
-- session (max_locks_per_transaction x max_connections, 6,400 by default). A deletion
-- blocks the chunks of 1/64 of the patients for the moment it runs.
SELECT pg_advisory_xact_lock(hashtext('medsim.patient'), (hashtextextended(%(key)s, 0) & 63)::int);

-- name: lock_patients_shared
-- Taken by every chunk of an ingest or a sync (sources/deletion.py refuse_withdrawn, inside
-- archive.write_chunk's transaction, after the dataset's row), for the patients of the
-- chunk, held to commit: see lock_patient_exclusive. Shared locks never block one another
-- (ingests of the same patients into other datasets run side by side); the stripes go in
-- one order, though no deletion holds one stripe and waits for another.
SELECT pg_advisory_xact_lock_shared(hashtext('medsim.patient'), t.stripe)
FROM (SELECT DISTINCT (hashtextextended(k, 0) & 63)::int AS stripe FROM unnest(%(keys)s::text[]) AS k
      ORDER BY 1) t;

-- name: withdrawn_patients
-- The tombstones: a patient deleted from medsim (their keyed hash), with the deletion that
-- withdrew them. Read under lock_patients_shared, in the transaction that stores.
SELECT target, min(id) FROM medsim.deletions
WHERE kind = 'patient' AND target = ANY(%(keys)s)
GROUP BY target;

-- name: existing_images
SELECT id FROM medsim.images WHERE id = ANY(%(ids)s);

-- name: count_embeddings_of
SELECT count(*) FROM medsim.embeddings WHERE image_id = ANY(%(ids)s);

-- name: copies_elsewhere
-- Images outside the set with the same pixels as one in it (another archive, no patient id).
SELECT i.id, d.flag FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE i.sha256 IN (SELECT sha256 FROM medsim.images WHERE id = ANY(%(ids)s)) AND NOT i.id = ANY(%(ids)s)
ORDER BY i.id;

-- name: dequeue_images
-- Before the images: waits for a worker's batch that holds these queue rows (claimed) to
-- commit, while no image row is locked yet (the batch's COPY locks image rows for its
-- foreign-key check; the other order deadlocked).
DELETE FROM medsim.embedding_queue WHERE image_id = ANY(%(ids)s);

-- name: delete_images
-- Embeddings (and any queue row added since) go with their images (ON DELETE CASCADE).
DELETE FROM medsim.images WHERE id = ANY(%(ids)s);

-- name: delete_calibrations_of
DELETE FROM medsim.calibrations WHERE dataset = %(name)s;

-- name: delete_dataset
DELETE FROM medsim.datasets WHERE flag = %(name)s;

-- name: insert_deletion
INSERT INTO medsim.deletions (kind, target, images, embeddings, reason)
VALUES (%(kind)s, %(target)s, %(images)s, %(embeddings)s, %(reason)s)
RETURNING id;

-- name: deletion_after
-- The first deletion recorded after a FAISS build: its file may hold deleted vectors.
SELECT d.id, d.kind, d.deleted_at FROM medsim.deletions d, medsim.index_builds b
WHERE b.id = %(build_id)s AND d.deleted_at > b.created_at
ORDER BY d.id LIMIT 1;

-- ===================================================================== leakage audit

-- name: model_vectors
-- A model's embeddings with their splits, in the datasets audited (NULL: every one).
SELECT e.image_id, i.split, e.embedding
FROM medsim.embeddings e JOIN medsim.images i ON i.id = e.image_id JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE e.model_id = %(model_id)s AND (%(datasets)s::text[] IS NULL OR d.flag = ANY(%(datasets)s::text[]))
ORDER BY e.image_id;

-- name: audit_pixels
-- The pixels of the embedded images audited, in the order of model_vectors.
SELECT i.id, i.pixels, i.height, i.width, i.channels, i.bit_depth
FROM medsim.embeddings e JOIN medsim.images i ON i.id = e.image_id JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE e.model_id = %(model_id)s AND (%(datasets)s::text[] IS NULL OR d.flag = ANY(%(datasets)s::text[]))
ORDER BY e.image_id;

-- name: count_images
SELECT count(*) FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE (%(datasets)s::text[] IS NULL OR d.flag = ANY(%(datasets)s::text[]));

-- name: exact_duplicate_pairs
-- Identical pixels, with whether their labels differ (by name: datasets number labels
-- their own way).
SELECT a.id AS image_a, b.id AS image_b, a.split AS split_a, b.split AS split_b,
       medsim.label_names(a.dataset_id, a.labels) IS DISTINCT FROM medsim.label_names(b.dataset_id, b.labels)
           AS labels_differ
FROM medsim.images a JOIN medsim.images b ON b.sha256 = a.sha256 AND b.id > a.id
JOIN medsim.datasets da ON da.id = a.dataset_id JOIN medsim.datasets db ON db.id = b.dataset_id
WHERE %(datasets)s::text[] IS NULL OR (da.flag = ANY(%(datasets)s::text[]) AND db.flag = ANY(%(datasets)s::text[]))
ORDER BY 1, 2;

-- name: patient_split_pairs
-- One pair per (image, other split) of the same patient: the first image of the
-- patient in each other split, not every combination.
SELECT a.id AS image_a, min(b.id) AS image_b, a.split AS split_a, b.split AS split_b
FROM medsim.images a JOIN medsim.images b
     ON b.patient_key = a.patient_key AND b.split > a.split
JOIN medsim.datasets da ON da.id = a.dataset_id JOIN medsim.datasets db ON db.id = b.dataset_id
WHERE a.patient_key IS NOT NULL
  AND (%(datasets)s::text[] IS NULL OR (da.flag = ANY(%(datasets)s::text[]) AND db.flag = ANY(%(datasets)s::text[])))
GROUP BY a.id, a.split, b.split
ORDER BY 1, 2;

-- name: insert_audit
INSERT INTO medsim.audits (model_id, threshold, summary) VALUES (%(model_id)s, %(threshold)s, %(summary)s)
RETURNING id;

-- name: copy_audit_findings
COPY medsim.audit_findings (audit_id, kind, image_a, image_b, split_a, split_b, distance, labels_differ, correlation)
FROM STDIN;

-- name: leaked_test_images
-- Test images paired, in the model's latest audit, with a train or val image, where both
-- belong to the model's own datasets (a copy in an archive the model never saw does not
-- flatter its figures).
SELECT CASE WHEN l.split_a = 'test' THEN l.image_a ELSE l.image_b END
FROM medsim.leakage l
JOIN medsim.images ia ON ia.id = l.image_a JOIN medsim.datasets da ON da.id = ia.dataset_id
JOIN medsim.images ib ON ib.id = l.image_b JOIN medsim.datasets db ON db.id = ib.dataset_id
WHERE l.model_id = %(model_id)s AND l.across_splits AND 'test' IN (l.split_a, l.split_b)
  AND (l.split_a IN ('train', 'val') OR l.split_b IN ('train', 'val'))
  AND da.flag = ANY(%(datasets)s) AND db.flag = ANY(%(datasets)s);

-- ===================================================================== training data

-- name: load_images
SELECT i.id, i.dataset_id, i.labels, i.pixels, i.height, i.width, i.channels, i.bit_depth
FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE i.split = ANY(%(splits)s)
  AND (%(flags)s::text[] IS NULL OR d.flag = ANY(%(flags)s::text[]))
  -- MedMNIST comes at several sizes, one dataset row each: read the one asked for.
  -- Archives hold images of any size: all of them, resized on the way in.
  AND (d.source_kind <> 'medmnist' OR d.image_size = %(size)s)
ORDER BY i.id;

-- name: dataset_flags
SELECT id, flag, task FROM medsim.datasets;

-- ===================================================================== model registry

-- name: insert_model
INSERT INTO medsim.models (name, preset, mode, config, train_config, datasets, embedding_dim,
                           checkpoint, checkpoint_sha256, best_epoch, best_val_loss, train_seconds,
                           candidate, promote_when_ready)
VALUES (%(name)s, %(preset)s, %(mode)s, %(config)s, %(train_config)s, %(datasets)s,
        %(embedding_dim)s, %(checkpoint)s, %(sha256)s, %(best_epoch)s, %(best_val_loss)s,
        %(train_seconds)s, %(candidate)s, %(promote_when_ready)s)
RETURNING id;

-- name: candidate_models
SELECT id FROM medsim.models WHERE candidate ORDER BY id;

-- name: models_in_line
SELECT id FROM medsim.models WHERE is_current OR candidate ORDER BY is_current DESC, id;

-- name: gallery_missing
-- Images the model has no embedding for (what a promotion would leave unsearchable), and
-- all images: one pass over images with an index probe per row.
SELECT count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM medsim.embeddings e
                                          WHERE e.model_id = %(model_id)s AND e.image_id = i.id)),
       count(*)
FROM medsim.images i;

-- name: lock_models_for_promotion
-- The rows of the model to promote and of the current one, locked in id order (two
-- promotions at once take turns instead of deadlocking; the partial unique index on
-- is_current would refuse the second's switch anyway).
SELECT id, is_current, candidate FROM medsim.models WHERE id = %(id)s OR is_current ORDER BY id FOR UPDATE;

-- name: make_current
-- after unset_current, in the same transaction (the unique index on is_current is checked
-- row by row: one UPDATE switching both rows can meet the old one still set)
UPDATE medsim.models SET is_current = true, candidate = false WHERE id = %(id)s;

-- name: insert_promotion
INSERT INTO medsim.model_promotions (model_id, previous_id, kind, missing, by_user)
VALUES (%(model_id)s, %(previous_id)s, %(kind)s, %(missing)s, %(by)s) RETURNING id;

-- name: last_promotion
SELECT model_id, previous_id, kind, at FROM medsim.model_promotions ORDER BY id DESC LIMIT 1;

-- name: set_candidate
UPDATE medsim.models SET candidate = %(candidate)s WHERE id = %(id)s AND NOT is_current;

-- name: insert_epoch
INSERT INTO medsim.training_epochs (model_id, epoch, train_loss, train_acc, val_loss, val_acc,
                                    val_auc, seconds)
VALUES (%(model_id)s, %(epoch)s, %(train_loss)s, %(train_acc)s, %(val_loss)s, %(val_acc)s,
        %(val_auc)s, %(seconds)s);

-- name: current_model
-- model_catalog: a user's role sees only the granted datasets among those it was trained on
SELECT id, name, preset, mode, embedding_dim, datasets, config, is_current, candidate
FROM medsim.model_catalog WHERE is_current;

-- name: model_by_id
SELECT id, name, preset, mode, embedding_dim, datasets, config, is_current, candidate
FROM medsim.model_catalog WHERE id = %(id)s;

-- name: model_checkpoint
SELECT checkpoint, checkpoint_sha256 FROM medsim.models WHERE id = %(id)s;

-- name: model_checkpoint_sha256
-- The checkpoint's name without its bytes: a kept ONNX export is found by it.
SELECT checkpoint_sha256 FROM medsim.models WHERE id = %(id)s;

-- name: unset_current
UPDATE medsim.models SET is_current = false WHERE is_current;

-- name: set_current
UPDATE medsim.models SET is_current = true WHERE id = %(id)s;

-- name: list_models
SELECT m.id, m.name, m.preset, m.mode, m.embedding_dim, m.datasets, m.config, m.is_current, m.candidate,
       m.best_epoch, m.best_val_loss, m.train_seconds, m.created_at
FROM medsim.model_catalog m ORDER BY m.id;

-- name: insert_evaluation
INSERT INTO medsim.evaluations (model_id, seed, results) VALUES (%(model_id)s, %(seed)s, %(results)s)
RETURNING id;

-- ===================================================================== embedding queue

-- name: lock_queue_shared
-- Taken by every batch transaction before it writes (embeddings COPY, queue DELETE), held to
-- commit; lock_queue_exclusive by enqueue_model.
-- Why: enqueue_model decides "not embedded yet" from its snapshot, which cannot see a
-- batch still in flight. If that batch has already deleted its queue rows, the INSERT
-- waits for it (ON CONFLICT on a row being deleted), finds no conflict once it
-- commits, and queues the just-embedded images again; a worker then COPYs a duplicate
-- (model_id, image_id) and fails. FOR SHARE locks never block one another, so workers
-- still run in parallel; enqueue waits for the batches in flight, and new batches wait
-- for the enqueue (one anti-join).
-- Why a row lock on the model and not an advisory lock: any login can take any advisory
-- lock, so a read-only analyst's pg_advisory_lock() stalled every worker indefinitely.
-- Row locks need UPDATE privilege, which medsim_reader does not have. FOR SHARE does not
-- conflict with the FOR KEY SHARE that foreign-key checks take on the same row.
SELECT 1 FROM medsim.models WHERE id = %(model_id)s FOR SHARE;

-- name: lock_model_registry
-- Two registrations at once on an empty registry: both saw "no current model" and made
-- themselves current one after the other, leaving the first neither current nor a
-- candidate (never embedded). Taken by registry.register_and_place until commit; it
-- conflicts with itself and with writes to medsim.models, not with reads.
LOCK TABLE medsim.models IN SHARE ROW EXCLUSIVE MODE;

-- name: lock_queue_exclusive
-- FOR NO KEY UPDATE: conflicts with the batches' FOR SHARE, not with foreign-key checks.
SELECT 1 FROM medsim.models WHERE id = %(model_id)s FOR NO KEY UPDATE;

-- name: enqueue_model
-- Make every image without an embedding for this model pending for it. Idempotent.
-- Run only after lock_queue_exclusive, in the same transaction (registry.enqueue):
-- under READ COMMITTED this statement's snapshot is then taken after every batch in
-- flight has committed or rolled back.
INSERT INTO medsim.embedding_queue (model_id, image_id)
SELECT %(model_id)s, i.id FROM medsim.images i
WHERE NOT EXISTS (SELECT 1 FROM medsim.embeddings e
                  WHERE e.model_id = %(model_id)s AND e.image_id = i.id)
ON CONFLICT DO NOTHING;

-- name: claim_batch
-- Claim, compute and write happen in ONE transaction (see Worker.claim and Worker.finish):
-- FOR UPDATE OF q SKIP LOCKED locks only this model's queue rows, so concurrent
-- workers take disjoint batches and workers of other models are never blocked. If the
-- worker dies (SIGKILL, lost connection) its transaction rolls back, the locks vanish
-- and the rows are simply claimable again: no lease or expiry to manage. The price is
-- a transaction open for one batch's inference (tens of milliseconds).
-- The queue rows are picked (and locked) on their own before the pixels are joined:
-- sorting the whole queue together with image bytes cost 15 ms a batch.
WITH claimed AS (
    SELECT q.image_id
    FROM medsim.embedding_queue q
    WHERE q.model_id = %(model_id)s AND q.failed_at IS NULL AND q.retry_after <= now()
    ORDER BY q.image_id
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
)
SELECT c.image_id AS id, i.pixels, i.height, i.width, i.channels, i.bit_depth
FROM claimed c JOIN medsim.images i ON i.id = c.image_id
ORDER BY c.image_id;

-- name: copy_embeddings
COPY medsim.embeddings (model_id, image_id, embedding) FROM STDIN WITH (FORMAT BINARY);

-- name: drop_embedded_from_queue
-- Queue rows whose embedding already exists (a row added by hand, or by an enqueue
-- that did not take the queue lock): the worker's COPY would fail on them.
DELETE FROM medsim.embedding_queue q USING medsim.embeddings e
WHERE q.model_id = %(model_id)s AND e.model_id = q.model_id AND e.image_id = q.image_id;

-- name: dequeue
DELETE FROM medsim.embedding_queue WHERE model_id = %(model_id)s AND image_id = ANY(%(ids)s);

-- name: record_failure
-- Exponential backoff; after max_attempts the row is failed for good (failed_at set)
-- and no longer claimed. `medsim status` and medsim.embedding_status show it.
UPDATE medsim.embedding_queue
SET attempts = attempts + 1,
    last_error = %(error)s,
    retry_after = now() + make_interval(secs => %(delay_s)s * power(2, attempts)),
    failed_at = CASE WHEN attempts + 1 >= %(max_attempts)s THEN now() END
WHERE model_id = %(model_id)s AND image_id = %(image_id)s
RETURNING failed_at IS NOT NULL AS final;

-- name: workers_on_host
-- medsim workers connected from this host (their application_name names it), this one included.
SELECT count(*) FROM pg_stat_activity WHERE application_name = %(app)s;

-- name: listen_images
LISTEN medsim_images;

-- name: analyze_embeddings
ANALYZE medsim.embeddings;

-- name: count_model_embeddings
SELECT count(*) FROM medsim.embeddings WHERE model_id = %(model_id)s;

-- name: pending_count
SELECT count(*) FROM medsim.embedding_queue
WHERE model_id = %(model_id)s AND failed_at IS NULL;

-- name: embedding_status
SELECT model_id, model_name, is_current, dataset, total, embedded, pending, failed, oldest_pending
FROM medsim.embedding_status
WHERE (%(model_id)s::int IS NULL OR model_id = %(model_id)s::int)
ORDER BY model_id, dataset;

-- name: not_embedded_mark
-- The newest image a model has embedded or queued (two descents of primary keys): every
-- image past it is one no worker has queued yet (not_embedded_by_dataset).
SELECT greatest(
    coalesce((SELECT max(e.image_id) FROM medsim.embeddings e WHERE e.model_id = %(model_id)s), 0),
    coalesce((SELECT max(q.image_id) FROM medsim.embedding_queue q WHERE q.model_id = %(model_id)s), 0));

-- name: not_embedded_by_dataset
-- A model's images in these splits that have no embedding yet, per dataset: the model's
-- queue rows whose image is not embedded (waiting or failed), and every image past the
-- mark (not_embedded_mark: ingested since a worker last queued, or none ran yet). Asked
-- on every search (the service keeps the answer a few seconds), so it costs what is
-- missing, never the gallery: the model's queue rows, a range of the images' primary key
-- past the mark, and a dataset's image count only for a dataset with something missing
-- (300,000 images on a loaded 2-core machine: 1.2 ms with the mark, all embedded; 53 ms
-- with 1,000 new images, most of it the dataset's count; medsim.embedding_status, which
-- reads every image, 390 ms). The mark is a value, not a subquery: against a subquery
-- the planner guessed a third of the images past it and started parallel workers (19 ms
-- for no rows). Each branch finds its images by primary key: joined after the union,
-- every image was hashed (211 ms).
-- Not seen: an image under the mark whose embedding was deleted (revision 0014) that no
-- worker has queued again yet; medsim.embedding_status counts it.
-- As the caller's role: row-level security leaves out what it may not see.
WITH missing AS (
    SELECT i.dataset_id, q.failed_at IS NOT NULL AS failed
    FROM medsim.embedding_queue q JOIN medsim.images i ON i.id = q.image_id
    WHERE q.model_id = %(model_id)s AND i.split = ANY(%(splits)s::text[])
      AND NOT EXISTS (SELECT 1 FROM medsim.embeddings e WHERE e.model_id = q.model_id AND e.image_id = q.image_id)
    UNION ALL
    SELECT i.dataset_id, false FROM medsim.images i
    WHERE i.id > %(mark)s AND i.split = ANY(%(splits)s::text[])
      -- (one embedded since the mark was read is not missing)
      AND NOT EXISTS (SELECT 1 FROM medsim.embeddings e WHERE e.model_id = %(model_id)s AND e.image_id = i.id)
), per_dataset AS (
    SELECT dataset_id, count(*) AS missing, count(*) FILTER (WHERE failed) AS failed FROM missing GROUP BY dataset_id
)
SELECT d.flag AS dataset, sum(p.missing)::bigint AS missing, sum(p.failed)::bigint AS failed,
       (SELECT count(*) FROM medsim.images t JOIN medsim.datasets td ON td.id = t.dataset_id
        WHERE td.flag = d.flag AND t.split = ANY(%(splits)s::text[])) AS total
FROM per_dataset p JOIN medsim.datasets d ON d.id = p.dataset_id
GROUP BY d.flag ORDER BY d.flag;

-- name: failures
SELECT model_id, image_id, attempts, last_error, failed_at FROM medsim.embedding_queue
WHERE last_error IS NOT NULL AND (%(model_id)s::int IS NULL OR model_id = %(model_id)s::int)
ORDER BY model_id, image_id;

-- ===================================================================== FAISS builds and recall

-- name: embedding_fingerprint
-- Row count and a digest over (image id, embedding) in id order: any added, removed,
-- replaced or re-embedded row changes it.
SELECT count(*), coalesce(md5(string_agg(image_id::text || ':' || md5(embedding::text), ','
                                         ORDER BY image_id)), 'empty')
FROM medsim.embedded_images
WHERE model_id = %(model_id)s AND split = ANY(%(splits)s);

-- name: gallery_version
-- Bumped by every statement that changes the model's embeddings (sql/002_embeddings.sql).
SELECT coalesce((SELECT version FROM medsim.gallery_versions WHERE model_id = %(model_id)s), 0);

-- name: next_index_build_id
-- Taken before the files are written, so the .json names its build and the row can be
-- inserted last (a row never points at a file without metadata).
SELECT nextval(pg_get_serial_sequence('medsim.index_builds', 'id'));

-- name: insert_index_build
INSERT INTO medsim.index_builds (id, model_id, kind, params, source_view, splits, dim, metric,
                                 n_rows, fingerprint, path, build_seconds, file_sha256, file_bytes,
                                 gallery_version)
OVERRIDING SYSTEM VALUE
VALUES (%(build_id)s, %(model_id)s, %(kind)s, %(params)s, %(source_view)s, %(splits)s, %(dim)s,
        %(metric)s, %(n_rows)s, %(fingerprint)s, %(path)s, %(build_seconds)s, %(file_sha256)s,
        %(file_bytes)s, %(gallery_version)s);

-- name: index_build
SELECT id, model_id, kind, splits, n_rows, path, file_sha256, file_bytes FROM medsim.index_builds
WHERE id = %(id)s;

-- name: index_builds
SELECT id, model_id, kind, splits, n_rows, path, file_sha256, file_bytes, created_at FROM medsim.index_builds
WHERE (%(model_id)s::int IS NULL OR model_id = %(model_id)s::int)
ORDER BY id;

-- name: insert_recall_report
INSERT INTO medsim.recall_reports (model_id, build_ids, report) VALUES (%(model_id)s, %(build_ids)s, %(report)s)
RETURNING id;

-- name: query_vectors
SELECT image_id, embedding FROM medsim.embedded_images
WHERE model_id = %(model_id)s AND split = ANY(%(splits)s)
ORDER BY image_id;

-- ===================================================================== search

-- name: query_image
-- A stored image as a query: what it is and its vector for the model (NULL when not
-- embedded yet); no pixels (the service's reader may not read them).
SELECT i.id, d.flag AS dataset, i.split, medsim.label_name(i.dataset_id, i.labels) AS label_name,
       medsim.label_names(i.dataset_id, i.labels) AS label_names, i.patient_key, e.embedding
FROM medsim.images i
JOIN medsim.datasets d ON d.id = i.dataset_id
LEFT JOIN medsim.embeddings e ON e.image_id = i.id AND e.model_id = %(model_id)s
WHERE i.id = %(id)s;

-- name: images_by_sha256
-- Stored images with exactly these pixels (a query file or upload that is on file), the
-- lowest id first: the query takes that image's identity.
SELECT i.id, d.flag AS dataset, i.split, medsim.label_name(i.dataset_id, i.labels) AS label_name,
       medsim.label_names(i.dataset_id, i.labels) AS label_names, i.patient_key, NULL::vector AS embedding
FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE i.sha256 = %(sha256)s
ORDER BY i.id;

-- name: images_by_phash
-- Stored images whose perceptual hash is within max_bits of a query's: candidates for "the
-- query is this image at another size", confirmed by their pixels (search/pipeline.py).
-- Multi-index hashing: hashes within 3 bits agree on at least one of the four 16-bit bands
-- (revision 0021 indexes each), so the inner scan is four index lookups; it stops at `scan`
-- rows, so a band that thousands of images share costs at most that many bit counts.
SELECT i.id, d.flag AS dataset, i.split, medsim.label_name(i.dataset_id, i.labels) AS label_name,
       medsim.label_names(i.dataset_id, i.labels) AS label_names, i.patient_key, NULL::vector AS embedding,
       c.bits
FROM (SELECT id, bit_count((phash # %(phash)s::bigint)::bit(64)) AS bits
      FROM medsim.images
      WHERE ((phash >> 48) & 65535) = %(b0)s::bigint OR ((phash >> 32) & 65535) = %(b1)s::bigint
         OR ((phash >> 16) & 65535) = %(b2)s::bigint OR (phash & 65535) = %(b3)s::bigint
      LIMIT %(scan)s) c
JOIN medsim.images i ON i.id = c.id JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE c.bits <= %(max_bits)s
ORDER BY c.bits, i.id
LIMIT %(k)s;

-- name: images_near_phash
-- images_by_phash for a query smaller than the hash (a thumbnail, whose hash a 0.5x
-- nearest-neighbour shrink moves up to 18 bits, often past every band): every stored hash's
-- bit count, one pass over the column, run only for such queries.
SELECT i.id, d.flag AS dataset, i.split, medsim.label_name(i.dataset_id, i.labels) AS label_name,
       medsim.label_names(i.dataset_id, i.labels) AS label_names, i.patient_key, NULL::vector AS embedding,
       c.bits
FROM (SELECT id, bit_count((phash # %(phash)s::bigint)::bit(64)) AS bits FROM medsim.images
      WHERE phash IS NOT NULL) c
JOIN medsim.images i ON i.id = c.id JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE c.bits <= %(max_bits)s
ORDER BY c.bits, i.id
LIMIT %(k)s;

-- name: images_without_phash
-- A batch of rows stored before revision 0021 (or by hand), for `medsim migrate` to hash.
SELECT id, pixels, height, width, channels, bit_depth FROM medsim.images
WHERE phash IS NULL AND id > %(after)s ORDER BY id LIMIT %(n)s;

-- name: set_phashes
UPDATE medsim.images i SET phash = v.phash
FROM unnest(%(ids)s::bigint[], %(phashes)s::bigint[]) AS v(id, phash) WHERE i.id = v.id;

-- name: search_gallery
SELECT image_id, dataset, split, label_name, label_names, distance, patient_key, study_id
FROM medsim.search_gallery(%(q)s, %(k)s, %(model_id)s, %(filter)s, %(exclude_patient)s, %(exclude)s,
                           %(per_patient)s, %(splits)s::text[]);

-- name: gallery_count
SELECT count(*) FROM medsim.gallery g
WHERE g.model_id = %(model_id)s
  AND medsim.gallery_match(g.dataset, g.split, g.label_names, g.metadata, g.patient_key, %(filter)s, NULL);

-- name: gallery_metadata_keys
-- The metadata keys a filter can name for this model's gallery (read only when a filtered
-- search found nothing, to tell a mistyped key from a value that matches nothing).
SELECT DISTINCT k FROM medsim.gallery g, jsonb_object_keys(g.metadata) k
WHERE g.model_id = %(model_id)s ORDER BY k;

-- name: gallery_ids_matching
-- What a FAISS search may return under a filter (its IDSelector), by the same rule as
-- medsim.search_gallery.
SELECT g.image_id FROM medsim.embedded_images g
WHERE g.model_id = %(model_id)s AND g.split = ANY(%(splits)s::text[])
  AND medsim.gallery_match(g.dataset, g.split, g.label_names, g.metadata, g.patient_key, %(filter)s,
                           %(exclude_patient)s);

-- name: image_metadata
SELECT i.id AS image_id, d.flag AS dataset, i.split, medsim.label_name(i.dataset_id, i.labels) AS label_name,
       medsim.label_names(i.dataset_id, i.labels) AS label_names, i.patient_key, i.study_id
FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE i.id = ANY(%(ids)s);

-- name: image_pixels
SELECT id, pixels, height, width, channels, bit_depth FROM medsim.images WHERE id = ANY(%(ids)s);

-- name: latest_index_build
-- A model's gallery build to search: of one kind if asked; fresh first (its gallery
-- version is the model's now), then exact (flat), then the newest.
SELECT b.id FROM medsim.index_builds b
WHERE b.model_id = %(model_id)s AND b.splits = %(splits)s::text[]
  AND (%(kind)s::text IS NULL OR b.kind = %(kind)s::text)
ORDER BY (b.gallery_version IS NOT DISTINCT FROM
          (SELECT g.version FROM medsim.gallery_versions g WHERE g.model_id = b.model_id)) DESC,
         (b.kind = 'flat') DESC, b.id DESC
LIMIT 1;

-- name: index_build_splits
-- The split sets a model's builds hold, to say why none answers for another set.
SELECT DISTINCT array_to_string(b.splits, ', ') FROM medsim.index_builds b
WHERE b.model_id = %(model_id)s ORDER BY 1;

-- name: builds_before_deletion
SELECT b.path FROM medsim.index_builds b, medsim.deletions d
WHERE d.id = %(deletion_id)s AND b.created_at < d.deleted_at;

-- ===================================================================== demo

-- name: models_of_kind
-- candidates for reuse, newest first; registry.reusable compares their recipes
SELECT id, train_config FROM medsim.models
WHERE preset = %(preset)s AND mode = %(mode)s AND datasets = %(flags)s::text[]
ORDER BY id DESC;

-- name: epoch_history
SELECT epoch, train_loss, train_acc, val_loss, val_acc FROM medsim.training_epochs
WHERE model_id = %(model_id)s ORDER BY epoch;

-- name: latest_evaluation
SELECT id, results FROM medsim.evaluations WHERE model_id = %(model_id)s ORDER BY id DESC LIMIT 1;

-- name: evaluable_datasets
-- What evaluation needs of each dataset asked for: images per split and how many distinct
-- label vectors (an empty vector is no label). MedMNIST at the size evaluation reads, as
-- load_images does; archives at any size.
SELECT d.flag AS dataset,
       count(i.id) FILTER (WHERE i.split = 'train') AS train,
       count(i.id) FILTER (WHERE i.split = 'val') AS val,
       count(i.id) FILTER (WHERE i.split = 'test') AS test,
       count(DISTINCT i.labels) FILTER (WHERE cardinality(i.labels) > 0) AS labels
FROM medsim.datasets d LEFT JOIN medsim.images i ON i.dataset_id = d.id
WHERE d.flag = ANY(%(flags)s::text[]) AND (d.source_kind <> 'medmnist' OR d.image_size = %(size)s)
GROUP BY d.flag ORDER BY d.flag;

-- name: compare_models
-- The registry's facts `medsim models compare` shows: octet_length reads the checkpoint's
-- size from its TOAST header, not the bytes.
SELECT m.id, m.name, m.is_current, m.datasets, (m.config ->> 'image_size')::int AS input_size,
       octet_length(m.checkpoint) AS checkpoint_bytes
FROM medsim.models m WHERE (%(ids)s::int[] IS NULL OR m.id = ANY(%(ids)s::int[])) ORDER BY m.id;

-- name: compare_evaluations
-- Per model and dataset, the latest stored evaluation that measured that dataset (an
-- evaluation of one archive must not hide the model's figures on the others), in the
-- literature's definitions.
SELECT DISTINCT ON (e.model_id, l.key) e.model_id, l.key AS dataset, e.id AS evaluation_id,
       (l.value ->> 'map@5')::float8 AS map5, (l.value ->> 'acc@1')::float8 AS acc1,
       (l.value ->> 'n_queries')::int AS queries
FROM medsim.evaluations e CROSS JOIN LATERAL jsonb_each(coalesce(e.results -> 'literature', '{}')) l
WHERE e.model_id = ANY(%(ids)s::int[])
ORDER BY e.model_id, l.key, e.id DESC;

-- name: compare_calibrations
SELECT model_id, dataset, (report ->> 'ece_test')::float8 AS ece, (report ->> 'vote_ece_test')::float8 AS vote_ece
FROM medsim.calibrations WHERE model_id = ANY(%(ids)s::int[]) ORDER BY model_id, dataset;

-- name: probe_images
-- The fixed batch `medsim models compare` times every model on: the first stored images by id.
SELECT id, pixels, height, width, channels, bit_depth FROM medsim.images ORDER BY id LIMIT %(n)s;

-- name: first_test_image_per_dataset
SELECT min(i.id) FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE i.split = 'test' AND d.flag = ANY(%(flags)s)
GROUP BY d.flag ORDER BY d.flag;

-- ===================================================================== HTTP service (medsim serve)
-- The search side runs as medsim_reader: no pixels, no checkpoint, no paths here.

-- name: image_details
SELECT i.id, d.flag AS dataset, i.split, medsim.label_name(i.dataset_id, i.labels) AS label_name,
       i.labels::int[] AS labels, i.height, i.width, i.channels, i.bit_depth, encode(i.sha256, 'hex') AS sha256,
       i.patient_key, i.study_id, i.metadata, i.original_height, i.original_width, i.created_at,
       ARRAY(SELECT e.model_id FROM medsim.embeddings e WHERE e.image_id = i.id ORDER BY e.model_id)
           AS embedded_for_models
FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE i.id = %(id)s;

-- name: image_pixels_one
SELECT id, pixels, height, width, channels, bit_depth FROM medsim.images WHERE id = %(id)s;

-- name: image_embedding
SELECT embedding FROM medsim.embeddings WHERE image_id = %(id)s AND model_id = %(model_id)s;

-- name: list_images
-- Browse: a page of images in id order, any split, filtered by the search's own rule
-- (medsim.gallery_match: dataset, split, label, modality, any metadata key) and a patient.
SELECT i.id, d.flag AS dataset, i.split, medsim.label_name(i.dataset_id, i.labels) AS label_name,
       i.patient_key, i.height, i.width, i.metadata ->> 'Modality' AS modality
FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE medsim.gallery_match(d.flag, i.split, medsim.label_names(i.dataset_id, i.labels), i.metadata,
                           i.patient_key, %(filter)s, NULL)
  AND (%(patient_key)s::text IS NULL OR i.patient_key = %(patient_key)s::text)
ORDER BY i.id OFFSET %(offset)s LIMIT %(limit)s;

-- name: count_images_matching
SELECT count(*) FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE medsim.gallery_match(d.flag, i.split, medsim.label_names(i.dataset_id, i.labels), i.metadata,
                           i.patient_key, %(filter)s, NULL)
  AND (%(patient_key)s::text IS NULL OR i.patient_key = %(patient_key)s::text);

-- name: image_sha256
SELECT encode(sha256, 'hex') FROM medsim.images WHERE id = %(id)s;

-- name: random_image
-- Uniform over the split's (and dataset's) images the caller may see: count them, then
-- skip a random number of them. The random offset is drawn once (a MATERIALIZED CTE); it
-- used to be `id >= lo + random() * (hi - lo)` in the WHERE clause, which draws again for
-- every row and so returned the first few ids of the split (5 distinct ids in 100 calls).
-- Two scans of the filtered ids: 8,236 images take a fraction of a millisecond.
WITH pick AS MATERIALIZED (
  SELECT floor(random() * count(*))::bigint AS skip
  FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
  WHERE i.split = %(split)s AND (%(dataset)s::text IS NULL OR d.flag = %(dataset)s::text))
SELECT i.id FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE i.split = %(split)s AND (%(dataset)s::text IS NULL OR d.flag = %(dataset)s::text)
ORDER BY i.id OFFSET (SELECT skip FROM pick) LIMIT 1;

-- name: datasets_overview
SELECT d.flag AS name, d.source_kind, d.label_names, d.task,
       coalesce((SELECT jsonb_object_agg(s.split, s.n) FROM
                 (SELECT i.split, count(*) AS n FROM medsim.images i WHERE i.dataset_id = d.id GROUP BY i.split) s),
                '{}') AS images_per_split
FROM medsim.datasets d ORDER BY d.flag;

-- ===================================================================== calibration

-- name: upsert_calibration
INSERT INTO medsim.calibrations (model_id, dataset, a, b, vote_a, vote_b, report)
VALUES (%(model_id)s, %(dataset)s, %(a)s, %(b)s, %(vote_a)s, %(vote_b)s, %(report)s)
ON CONFLICT (model_id, dataset) DO UPDATE
SET a = EXCLUDED.a, b = EXCLUDED.b, vote_a = EXCLUDED.vote_a, vote_b = EXCLUDED.vote_b,
    report = EXCLUDED.report, created_at = now();

-- name: calibrations_of
SELECT dataset, a, b, vote_a, vote_b, report -> 'vote_by_k' AS vote_by_k, (report ->> 'ood_d1')::float8 AS ood_d1,
       report -> 'vote_iso_by_k' AS vote_iso_by_k, report -> 'conformal' AS conformal,
       report -> 'recent_check' AS recent_check
FROM medsim.calibrations WHERE model_id = %(model_id)s ORDER BY dataset;

-- name: image_facts
-- What calibration needs of its queries and gallery beyond pixels and labels: the patient
-- (left out of its own neighbours) and the label's name as a search shows it.
SELECT id, patient_key, medsim.label_name(dataset_id, labels) AS label_name
FROM medsim.images WHERE id = ANY(%(ids)s);

-- ===================================================================== access

-- name: user_insert
INSERT INTO medsim.users (name, role_name) VALUES (%(name)s, %(role)s) RETURNING id;

-- name: user_by_name
SELECT id, name, role_name FROM medsim.users WHERE name = %(name)s;

-- name: users_overview
SELECT u.name, u.role_name, u.created_at,
       coalesce((SELECT array_agg(coalesce(d.flag, '*') ORDER BY d.flag NULLS FIRST)
                 FROM medsim.dataset_grants g LEFT JOIN medsim.datasets d ON d.id = g.dataset_id
                 WHERE g.role_name = u.role_name), '{}') AS datasets,
       (SELECT count(*) FROM medsim.tokens t WHERE t.user_id = u.id AND t.revoked_at IS NULL
          AND (t.expires_at IS NULL OR t.expires_at > now())) AS live_tokens,
       (SELECT max(t.last_used_at) FROM medsim.tokens t WHERE t.user_id = u.id) AS last_used_at
FROM medsim.users u ORDER BY u.name;

-- name: user_delete
-- its tokens go with it (ON DELETE CASCADE); its access-log rows stay (they name it by name)
DELETE FROM medsim.users WHERE id = %(id)s;

-- name: user_grants_delete
-- grants are rows keyed by role name: left behind, a new user of the same name inherited them
DELETE FROM medsim.dataset_grants WHERE role_name = %(role)s;

-- name: user_set_disabled
UPDATE medsim.users SET disabled_at = CASE WHEN %(disabled)s THEN now() END WHERE id = %(id)s;

-- name: role_sessions_end
-- a deleted or disabled SQL login's open sessions end now, not when it next reconnects
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE usename = %(role)s AND pid <> pg_backend_pid();

-- name: token_insert
INSERT INTO medsim.tokens (user_id, secret_sha256, scope, expires_at)
VALUES (%(user_id)s, %(digest)s, %(scope)s, %(expires_at)s) RETURNING id;

-- name: token_check
-- One row per request: the token, its user and whether the user's role sees every dataset.
SELECT t.id AS token_id, t.secret_sha256, t.scope, t.expires_at, t.revoked_at, t.last_used_at,
       u.id AS user_id, u.name, u.role_name, u.disabled_at,
       EXISTS (SELECT 1 FROM medsim.dataset_grants g
               WHERE g.role_name = u.role_name AND g.dataset_id IS NULL) AS sees_all,
       EXISTS (SELECT 1 FROM medsim.dataset_grants g WHERE g.role_name = u.role_name) AS granted
FROM medsim.tokens t JOIN medsim.users u ON u.id = t.user_id
WHERE t.id = %(id)s;

-- name: token_touch
UPDATE medsim.tokens SET last_used_at = now() WHERE id = %(id)s;

-- name: tokens_of
SELECT t.id, u.name, t.scope, t.created_at, t.expires_at, t.revoked_at, t.last_used_at
FROM medsim.tokens t JOIN medsim.users u ON u.id = t.user_id
WHERE %(name)s::text IS NULL OR u.name = %(name)s::text
ORDER BY t.id;

-- name: token_revoke
UPDATE medsim.tokens t SET revoked_at = now()
FROM medsim.users u
WHERE u.id = t.user_id AND t.revoked_at IS NULL
  AND (t.id = %(id)s OR (%(id)s::int IS NULL AND u.name = %(name)s))
RETURNING t.id;

-- name: datasets_by_flag
SELECT flag, id FROM medsim.datasets WHERE flag = ANY(%(flags)s);

-- name: grant_dataset
INSERT INTO medsim.dataset_grants (role_name, dataset_id) VALUES (%(role)s, %(dataset_id)s)
ON CONFLICT DO NOTHING;

-- name: revoke_datasets
DELETE FROM medsim.dataset_grants
WHERE role_name = %(role)s AND (dataset_id = ANY(%(ids)s) OR (%(all)s AND dataset_id IS NULL));

-- name: visible_datasets
-- As the caller's role: what row-level security lets it see.
SELECT flag FROM medsim.datasets ORDER BY flag;

-- name: keep_upload
INSERT INTO medsim.uploads (handle, expires_at, user_name, sha256, pixels, height, width, channels, bit_depth)
VALUES (%(handle)s, now() + make_interval(secs => %(hours)s * 3600), %(user_name)s, %(sha256)s, %(pixels)s,
        %(height)s, %(width)s, %(channels)s, %(bit_depth)s);

-- name: kept_upload
-- A kept upload's pixels, shaped as a stored image's row (StoredRow; the id is 0), whose
-- it is and its sha256 (uploads.Kept).
SELECT 0 AS id, pixels, height, width, channels, bit_depth, user_name, sha256 FROM medsim.uploads
WHERE handle = %(handle)s AND expires_at > now();

-- name: purge_uploads
DELETE FROM medsim.uploads WHERE expires_at <= now() RETURNING user_name, sha256;

-- name: log_access
-- chain_seq, prev_hash, row_hash and at are the chain trigger's (sql/007_access_log.sql)
INSERT INTO medsim.access_log (user_name, token_id, client, forwarded, action, query_kind, query_image_id,
                               query_sha256, model_id, engine, image_ids)
VALUES (%(user_name)s, %(token_id)s, %(client)s, %(forwarded)s, %(action)s, %(query_kind)s, %(query_image_id)s,
        %(query_sha256)s, %(model_id)s, %(engine)s, %(image_ids)s);

-- name: log_access_detail
-- an administrator's act on the log or on users (a purge, a user deleted): no image shown
INSERT INTO medsim.access_log (user_name, action, detail, image_ids)
VALUES (%(user_name)s, %(action)s, %(detail)s, '{}');

-- ===================================================================== the access log's chain (access_log.py)

-- name: access_log_head
SELECT chain_seq, row_hash FROM medsim.access_log_head;

-- name: access_log_lock_head
-- Held to the purge's commit: the chain trigger waits on the same row, so no row is
-- chained between the purge's choice of range and its own record.
SELECT chain_seq FROM medsim.access_log_head FOR UPDATE;

-- name: access_log_triggers
SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'medsim.access_log'::regclass AND NOT tgisinternal;

-- name: access_log_unchained
SELECT id FROM medsim.access_log WHERE chain_seq IS NULL OR prev_hash IS NULL OR row_hash IS NULL
ORDER BY id LIMIT 1;

-- name: access_log_walk
SELECT l.chain_seq, l.id, l.at, l.prev_hash, l.row_hash, medsim.access_log_digest(l)
FROM medsim.access_log l ORDER BY l.chain_seq;

-- name: access_log_purges
SELECT detail FROM medsim.access_log WHERE action = 'purge' ORDER BY chain_seq DESC;

-- name: access_log_last_before
SELECT chain_seq, row_hash FROM medsim.access_log WHERE at < %(before)s ORDER BY chain_seq DESC LIMIT 1;

-- name: access_log_delete_through
DELETE FROM medsim.access_log WHERE chain_seq <= %(through)s;

-- ===================================================================== PACS sync (sources/pacs.py)

-- name: pacs_try_lock
-- one sync per (dataset, URL) at a time; a session lock, released at the end or when the session dies
SELECT pg_try_advisory_lock(hashtextextended('medsim.pacs_sync:' || %(key)s, 0));

-- name: pacs_unlock
SELECT pg_advisory_unlock(hashtextextended('medsim.pacs_sync:' || %(key)s, 0));

-- name: pacs_source
SELECT s.id, s.cursor FROM medsim.pacs_sources s JOIN medsim.datasets d ON d.id = s.dataset_id
WHERE d.flag = %(name)s AND NOT d.is_medmnist AND s.url = %(url)s;

-- name: pacs_dataset_id
SELECT id FROM medsim.datasets WHERE flag = %(name)s AND NOT is_medmnist;

-- name: pacs_upsert_source
INSERT INTO medsim.pacs_sources (dataset_id, url, is_orthanc, viewer)
VALUES (%(dataset_id)s, %(url)s, %(is_orthanc)s, %(viewer)s)
ON CONFLICT (dataset_id, url) DO UPDATE SET is_orthanc = EXCLUDED.is_orthanc
RETURNING id;

-- name: pacs_set_viewer
UPDATE medsim.pacs_sources SET viewer = %(viewer)s WHERE id = %(id)s;

-- name: pacs_set_cursor
UPDATE medsim.pacs_sources SET cursor = %(cursor)s::jsonb, synced_at = now() WHERE id = %(id)s;

-- name: pacs_settled
SELECT sop_uid, frame FROM medsim.pacs_instances WHERE source_id = %(source_id)s AND sop_uid = ANY(%(sops)s);

-- name: pacs_settle
INSERT INTO medsim.pacs_instances (source_id, study_uid, series_uid, sop_uid, frame, image_id, outcome, reason,
                                   orthanc_study)
VALUES (%(source_id)s, %(study)s, %(series)s, %(sop)s, %(frame)s, %(image_id)s, %(outcome)s, %(reason)s,
        %(orthanc_study)s)
ON CONFLICT (source_id, sop_uid, frame) DO UPDATE
    SET image_id = EXCLUDED.image_id, outcome = EXCLUDED.outcome, reason = EXCLUDED.reason, synced_at = now();

-- name: pacs_stored_sops
SELECT sop_uid, image_id FROM medsim.pacs_instances WHERE source_id = %(source_id)s;

-- name: pacs_forget
DELETE FROM medsim.pacs_instances WHERE source_id = %(source_id)s AND sop_uid = ANY(%(sops)s);

-- name: pacs_rows_of_patient
-- A deleted patient's settled instances, still in clear: those that became their images,
-- and every other instance of the same studies (refused, duplicates). Read before the
-- images go (their image_id becomes NULL then).
SELECT p.source_id, p.study_uid, p.series_uid, p.sop_uid, p.frame FROM medsim.pacs_instances p
WHERE left(p.sop_uid, 2) <> 'k:'
  AND (p.image_id = ANY(%(ids)s)
       OR (p.source_id, p.study_uid) IN (SELECT source_id, study_uid FROM medsim.pacs_instances
                                         WHERE image_id = ANY(%(ids)s)));

-- name: pacs_hash_rows
-- Their UIDs replaced by keyed hashes ('k:' + keys.uid), Orthanc's study id (a digest of
-- the patient id and study UID) dropped: the rows stay, so a sync still knows the
-- instances as settled (pacs.py looks each listed UID up in clear and hashed).
UPDATE medsim.pacs_instances p
SET study_uid = m.study, series_uid = m.series, sop_uid = m.sop, orthanc_study = NULL
FROM unnest(%(source_ids)s::int[], %(old_sops)s::text[], %(frames)s::int[], %(studies)s::text[],
            %(series)s::text[], %(sops)s::text[]) AS m(source_id, old_sop, frame, study, series, sop)
WHERE p.source_id = m.source_id AND p.sop_uid = m.old_sop AND p.frame = m.frame;

-- name: pacs_links
-- the way back to the PACS for stored images: one row per image (its first instance)
SELECT DISTINCT ON (p.image_id) p.image_id, p.study_uid, p.series_uid, p.sop_uid, p.orthanc_study,
       s.url, s.viewer
FROM medsim.pacs_instances p JOIN medsim.pacs_sources s ON s.id = p.source_id
WHERE p.image_id = ANY(%(ids)s)
ORDER BY p.image_id, p.synced_at;

-- ===================================================================== a folder's files (sources/ledger.py)

-- name: ledger_rows
SELECT path, size, mtime_ns, sha256, listing FROM medsim.source_files
WHERE dataset_id = %(dataset_id)s AND path = ANY(%(paths)s);

-- name: ledger_touch
UPDATE medsim.source_files SET mtime_ns = %(mtime_ns)s, checked_at = now()
WHERE dataset_id = %(dataset_id)s AND path = %(path)s;

-- name: ledger_settle
INSERT INTO medsim.source_files (dataset_id, path, size, mtime_ns, sha256, listing, outcome, reason)
VALUES (%(dataset_id)s, %(path)s, %(size)s, %(mtime_ns)s, %(sha256)s, %(listing)s, %(outcome)s, %(reason)s)
ON CONFLICT (dataset_id, path) DO UPDATE
    SET size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, sha256 = EXCLUDED.sha256, listing = EXCLUDED.listing,
        outcome = EXCLUDED.outcome, reason = EXCLUDED.reason, checked_at = now();

-- name: ledger_forget
DELETE FROM medsim.source_files WHERE dataset_id = %(dataset_id)s AND path = %(path)s;

-- name: image_source_path
SELECT source_path, metadata FROM medsim.images WHERE id = %(id)s;

-- ===================================================================== SQL logins' limits (service/reaper.py)

-- name: reap_sql_logins
-- A SQL login can SET its own statement_timeout away (PostgreSQL lets any role change its
-- session's settings), so what runs past the limits medsim gives it is ended from outside:
-- a statement running too long is cancelled, a transaction left idle too long ends its
-- session. Only sessions that logged in as a medsim user's role: the service's own
-- connections log in as the owner and SET ROLE per request, so they never match.
SELECT a.pid, a.usename, a.state,
       CASE WHEN a.state = 'active' THEN pg_cancel_backend(a.pid) ELSE pg_terminate_backend(a.pid) END
FROM pg_stat_activity a JOIN medsim.users u ON u.role_name = a.usename
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
  AND ((a.state = 'active' AND a.query_start < now() - make_interval(secs => %(statement_s)s))
    OR (a.state LIKE 'idle in transaction%%' AND a.state_change < now() - make_interval(secs => %(idle_s)s)));

-- ===================================================================== promotions (search/promotion.py)

-- name: model_build_kinds
-- The FAISS index kinds (and split sets) a model has builds of, with the newest build's
-- file: a candidate gets the same before it is promoted, in the same folder.
SELECT DISTINCT ON (kind, splits) kind, splits, path FROM medsim.index_builds
WHERE model_id = %(model_id)s ORDER BY kind, splits, id DESC;

-- name: promote_when_ready
SELECT promote_when_ready AND candidate FROM medsim.models WHERE id = %(id)s;

-- name: train_image_sides
-- The training datasets' stored sizes (train split, read as load_images reads them): the
-- median of each image's shorter side is the archive's own size, the default network input.
SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY least(i.height, i.width)) AS median_side,
       max(greatest(i.height, i.width)) AS largest_side, count(*) AS images
FROM medsim.images i JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE i.split = 'train'
  AND (%(flags)s::text[] IS NULL OR d.flag = ANY(%(flags)s::text[]))
  AND (d.source_kind <> 'medmnist' OR d.image_size = %(size)s);

-- name: calibration_check_vectors
-- `medsim calibration check`: a model's embedded, labelled images of one dataset: those
-- ingested before `since` in the train split (the gallery, as the fit saw it) and those
-- ingested at or after it, any split (the queries a calibration has not seen).
SELECT e.image_id, i.created_at >= %(since)s AS recent, i.patient_key,
       medsim.label_name(i.dataset_id, i.labels) AS label_name, e.embedding
FROM medsim.embeddings e JOIN medsim.images i ON i.id = e.image_id JOIN medsim.datasets d ON d.id = i.dataset_id
WHERE e.model_id = %(model_id)s AND d.flag = %(dataset)s AND cardinality(i.labels) > 0
  AND ((i.split = 'train' AND i.created_at < %(since)s) OR i.created_at >= %(since)s)
ORDER BY e.image_id;

-- name: store_calibration_check
-- The latest check on recent images beside the fit it checked (report.recent_check), with
-- the database's time of it (checked_at: /status and searches say when). A new fit
-- (upsert_calibration) replaces the report, the check with it: it checked the old fit.
UPDATE medsim.calibrations
SET report = report || jsonb_build_object('recent_check', %(check)s::jsonb || jsonb_build_object('checked_at', now()))
WHERE model_id = %(model_id)s AND dataset = %(dataset)s;

-- name: recent_checks
-- /status: the latest check on recent images of each calibration of these models (the
-- datasets the caller sees: row security on medsim.calibrations); null where never checked.
SELECT model_id, dataset, report -> 'recent_check' AS recent_check
FROM medsim.calibrations WHERE model_id = ANY(%(model_ids)s::int[]);
