-- Runtime SQL for medsim, one query per `-- name:` header, parameterised with
-- %(name)s. Identifiers that vary (per-model index names, vector(N) casts) are
-- composed with psycopg.sql by the caller, never formatted into these strings.

-- ===================================================================== ingest

-- name: dataset_by_flag
SELECT d.id, d.source_md5, (SELECT count(*) FROM medsim.images i WHERE i.dataset_id = d.id)
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
COPY medsim.images (dataset_id, split, split_index, labels, height, width, channels, pixels, sha256)
FROM STDIN WITH (FORMAT BINARY);

-- name: dataset_summary
SELECT d.flag, d.image_size, d.md5_official, i.split, count(*)
FROM medsim.datasets d JOIN medsim.images i ON i.dataset_id = d.id
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, array_position(ARRAY['train', 'val', 'test'], i.split);
