"""Per-model pgvector HNSW indexes on the shared embeddings table.

Each model's rows get a partial expression index, so `ORDER BY embedding::vector(N)
<-> q WHERE model_id = M` can use it while other models' rows (other dimensions) sit
in the same table.
"""

from __future__ import annotations

import os

from psycopg import sql

from medsim.queries import Q, scalar


def index_name(model_id: int) -> str:
    return f"embeddings_hnsw_model_{int(model_id)}"


# pgvector's HNSW indexes vector up to 2,000 dimensions and halfvec up to 4,000: an imported
# encoder's wider output is indexed (and searched, schema/sql/004_search.sql) as halfvec
VECTOR_INDEX_MAX = 2000


def distance_expr(dim: int) -> sql.Composable:
    """`embedding::vector(dim)` (halfvec above 2,000 dimensions): the expression both the
    index and queries must use."""
    kind = "vector" if int(dim) <= VECTOR_INDEX_MAX else "halfvec"
    return sql.SQL("embedding::{}({})").format(sql.SQL(kind), sql.Literal(int(dim)))


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


def build_memory_mb(n: int, dim: int, m: int = DEFAULT_M) -> int:
    """maintenance_work_mem for building an HNSW graph of n vectors in memory: a graph
    that outgrows it is finished on disk, several times slower (pgvector says so in a
    NOTICE). About the vector, 2m level-0 neighbours and the element header per row, with
    a margin; at least 64 MB, at most a quarter of this machine's memory."""
    per_row = 4 * dim + 8 + 2 * m * 12 + 160
    want = int(n * per_row * 1.3 / 2**20) + 64
    try:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        ram_mb = 4096
    return max(64, min(want, ram_mb // 4))


def lock_model(conn, model_id: int) -> None:
    """The model's row, exclusively (the lock an enqueue takes): concurrent builds and drops
    take turns. A row lock, not an advisory lock: a read-only login cannot hold it."""
    conn.execute(Q.lock_queue_exclusive, {"model_id": int(model_id)})


def drop_statement(model_id: int) -> sql.Composed:
    return sql.SQL("DROP INDEX medsim.{}").format(sql.Identifier(index_name(model_id)))


def ensure(conn, model_id: int, dim: int, m: int = DEFAULT_M,
           ef_construction: int = DEFAULT_EF_CONSTRUCTION, replace: bool = False) -> bool:
    """Create the model's HNSW index if missing (or replace it) -> True if built now.

    Build after the bulk load (pgvector's advice: much faster than maintaining it row
    by row). A lock on the model's row makes concurrent callers (several workers draining at
    once) build it once; the others wait and then find it there.
    """
    with conn.transaction():
        lock_model(conn, model_id)
        if exists(conn, model_id):
            if not replace:
                return False
            # in the build's transaction: DROP INDEX locks medsim.embeddings until the new
            # index commits, so searches wait for the rebuild (seconds per 100k rows here)
            # instead of ever running without an index. A rollback keeps the old one.
            conn.execute(drop_statement(model_id))
        mem = build_memory_mb(scalar(conn, Q.count_model_embeddings, {"model_id": int(model_id)}), dim, m)
        conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (f"{mem}MB",))
        conn.execute(sql.SQL(
            "CREATE INDEX {name} ON medsim.embeddings USING hnsw (({expr}) {ops}) "
            "WITH (m = {m}, ef_construction = {efc}) WHERE model_id = {model_id}"
        ).format(name=sql.Identifier(index_name(model_id)), expr=distance_expr(dim),
                 ops=sql.SQL("vector_l2_ops" if int(dim) <= VECTOR_INDEX_MAX else "halfvec_l2_ops"),
                 m=sql.Literal(int(m)), efc=sql.Literal(int(ef_construction)),
                 model_id=sql.Literal(int(model_id))))
    return True


def drop(conn, model_id: int) -> bool:
    """Drop the model's HNSW index (before a bulk load) -> True if there was one. Under
    the model's row lock, like ensure(), so it never races a build."""
    with conn.transaction():
        lock_model(conn, model_id)
        if not exists(conn, model_id):
            return False
        conn.execute(drop_statement(model_id))
    return True
