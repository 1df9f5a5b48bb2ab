"""medsim: medical image similarity search with PostgreSQL + pgvector as the source of truth."""

__version__ = "0.1.0"
