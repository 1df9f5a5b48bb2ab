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
       e.embedding
FROM medsim.embeddings e
JOIN medsim.images i ON i.id = e.image_id
JOIN medsim.datasets d ON d.id = i.dataset_id;

-- What similar-image search returns: train + val images.
CREATE OR REPLACE VIEW medsim.gallery AS
SELECT * FROM medsim.embedded_images WHERE split IN ('train', 'val');

-- What recall is measured with: the held-out test images.
CREATE OR REPLACE VIEW medsim.query_images AS
SELECT * FROM medsim.embedded_images WHERE split = 'test';
