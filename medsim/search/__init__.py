"""Finding similar images: FAISS indexes, pgvector HNSW, recall against exact search,
and search itself.

Nothing heavy is imported here: `medsim search --image-id` through pgvector must not
pay for FAISS or torch.
"""

SPLITS = ("train", "val", "test")
# What a person's search returns and FAISS indexes by default: every image on file, so a
# test-split case (a fifth of an archive that brings no split of its own) is a neighbour
# too. The SQL side is the medsim.gallery view (sql/003_gallery.sql) and search_gallery's
# default; a test keeps them equal. The literature's protocol is a request away
# (Filters.splits = "train"); evaluation and calibration never read this default (they
# load each split themselves), and a query on file is never its own neighbour.
GALLERY_SPLITS = SPLITS

# pgvector: HNSW inside Postgres (or exact when there is no index); exact: pgvector with
# index scans off (the ground truth, slower); faiss: the model's latest FAISS build,
# loaded and checked once per call (once per process in `medsim serve`)
ENGINES = ("pgvector", "exact", "faiss")

# The most neighbours one query may ask for, everywhere (CLI, SQL functions, FAISS):
# k is checked before any work. FAISS allocates k results per query up front (k = 1e8
# took 4 GB), and the SQL functions refuse more than this too (sql/004_search.sql).
MAX_K = 1000
