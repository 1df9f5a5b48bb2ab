"""Finding similar images: FAISS indexes, pgvector HNSW, recall against exact search,
and search itself.

Nothing heavy is imported here: `medsim search --image-id` through pgvector must not
pay for FAISS or torch.
"""

# What search returns and FAISS indexes by default: train + val. The SQL side is the
# medsim.gallery view (sql/003_gallery.sql) and search_gallery's default; a test keeps them
# equal. A search may ask for other splits (Filters.splits): test too, or train alone.
GALLERY_SPLITS = ("train", "val")
SPLITS = ("train", "val", "test")

# pgvector: HNSW inside Postgres (or exact when there is no index); exact: pgvector with
# index scans off (the ground truth, slower); faiss: the model's latest FAISS build,
# loaded and checked once per call (once per process in `medsim serve`)
ENGINES = ("pgvector", "exact", "faiss")

# The most neighbours one query may ask for, everywhere (CLI, SQL functions, FAISS):
# k is checked before any work. FAISS allocates k results per query up front (k = 1e8
# took 4 GB), and the SQL functions refuse more than this too (sql/004_search.sql).
MAX_K = 1000
