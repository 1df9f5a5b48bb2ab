"""Per-model pgvector HNSW indexes on the shared embeddings table.

Each model's rows get a partial expression index, so `ORDER BY embedding::vector(N)
<-> q WHERE model_id = M` can use it while other models' rows (other dimensions) sit
in the same table.
"""

from __future__ import annotations

from psycopg import sql


def index_name(model_id: int) -> str:
    return f"embeddings_hnsw_model_{int(model_id)}"


def distance_expr(dim: int) -> sql.Composable:
    """`embedding::vector(dim)`: the expression both the index and queries must use."""
    return sql.SQL("embedding::vector({})").format(sql.Literal(int(dim)))


def exists(conn, model_id: int) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                        (f"medsim.{index_name(model_id)}",)).fetchone()[0]


# pgvector's defaults are m=16, ef_construction=64. On medsim's embeddings (L2-normalised,
# in tight per-subset clusters) that graph left some images reachable only at very large
# ef_search: two sweeps of four builds gave recall@10 as low as 0.9891 and 0.9606 at
# ef_search=40. ef_construction=200 gave 1.0000 in all eight builds for 1.6x the build time
# (bench/bench_recall.py --hnsw-sweep prints the comparison).
DEFAULT_M = 16
DEFAULT_EF_CONSTRUCTION = 200


def ensure(conn, model_id: int, dim: int, m: int = DEFAULT_M,
           ef_construction: int = DEFAULT_EF_CONSTRUCTION, replace: bool = False) -> bool:
    """Create the model's HNSW index if missing (or replace it) -> True if built now.

    Build after the bulk load (pgvector's advice: much faster than maintaining it row
    by row). A lock on the model's row makes concurrent callers (several workers draining at
    once) build it once; the others wait and then find it there.
    """
    with conn.transaction():
        # the model's row, not an advisory lock: a read-only login cannot hold it
        conn.execute("SELECT 1 FROM medsim.models WHERE id = %s FOR NO KEY UPDATE", (int(model_id),))
        if exists(conn, model_id):
            if not replace:
                return False
            # in the build's transaction: DROP INDEX locks medsim.embeddings until the new
            # index commits, so searches wait for the rebuild (seconds per 100k rows here)
            # instead of ever running without an index. A rollback keeps the old one.
            conn.execute(sql.SQL("DROP INDEX medsim.{}").format(sql.Identifier(index_name(model_id))))
        conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
        conn.execute(sql.SQL(
            "CREATE INDEX {name} ON medsim.embeddings USING hnsw (({expr}) vector_l2_ops) "
            "WITH (m = {m}, ef_construction = {efc}) WHERE model_id = {model_id}"
        ).format(name=sql.Identifier(index_name(model_id)), expr=distance_expr(dim),
                 m=sql.Literal(int(m)), efc=sql.Literal(int(ef_construction)),
                 model_id=sql.Literal(int(model_id))))
    return True
