"""Binary COPY payloads built with numpy: one structured array per batch, no Python
loop per row. Layout: PostgreSQL's binary COPY format (big-endian), see ingest and
embed_worker for the column lists."""

from __future__ import annotations

import numpy as np

HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)


def embeddings_rows(model_id: int, image_ids, vectors: np.ndarray) -> bytes:
    """Tuples (model_id int4, image_id int8, embedding vector) for COPY ... (FORMAT BINARY).

    pgvector's binary form of a vector: int16 dim, int16 unused, dim x float4.
    """
    n, dim = vectors.shape
    rows = np.zeros(n, dtype=np.dtype([
        ("nfields", ">i2"),
        ("l_model", ">i4"), ("model_id", ">i4"),
        ("l_image", ">i4"), ("image_id", ">i8"),
        ("l_vec", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("v", ">f4", (dim,)),
    ]))
    rows["nfields"] = 3
    rows["l_model"], rows["model_id"] = 4, model_id
    rows["l_image"], rows["image_id"] = 8, np.asarray(image_ids, np.int64)
    rows["l_vec"], rows["dim"], rows["v"] = 4 + 4 * dim, dim, vectors
    return rows.tobytes()
