"""Finding similar images: FAISS indexes, pgvector HNSW, recall against exact search,
and search itself.

Nothing heavy is imported here: `medsim search --image-id` through pgvector must not
pay for FAISS or torch.
"""

# What search returns and FAISS indexes: train + val. The SQL side is the medsim.gallery
# view (sql/003_gallery.sql), which every SQL function reads; a test keeps them equal.
GALLERY_SPLITS = ("train", "val")

# pgvector: HNSW inside Postgres (or exact when there is no index); faiss: the model's
# latest FAISS build, loaded and checked once per call
ENGINES = ("pgvector", "faiss")
