"""What a search needs besides its request: where it reads, and the expensive things it
may need (the network, a FAISS index, calibrations, stored pixels).

This Context loads each on first use and keeps it for its own life: one CLI call. The
service's context (medsim.service.state) serves the same from caches kept warm across
requests; the pipeline cannot tell them apart.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
from psycopg.types.json import Jsonb

from medsim import queue, registry
from medsim.errors import BadArgument, DataRefused
from medsim.images import StoredRow
from medsim.queries import Q, one
from medsim.search import GALLERY_SPLITS


class Context:
    def __init__(self, conn, owner=None, index_path=None):
        self.conn = conn  # where searches read (a replica, or the service's reader role)
        self.owner = owner or conn  # where checkpoints and pixels are read (the reader may not)
        self.index_path = index_path  # a FAISS file to search instead of the model's latest build
        self._nets, self._indexes, self._cals, self._selectors, self._missing = {}, {}, {}, {}, {}
        # the connection's role sees only some datasets (row-level security): FAISS, which
        # knows nothing of roles, then searches only the ids that role can read
        self.restricted = False

    def stage(self, name: str):
        """A context manager around each stage of a search (the service times them)."""
        return contextlib.nullcontext()

    def model(self, ref) -> registry.ModelRow:
        return registry.get(self.conn, ref)

    def network(self, model: registry.ModelRow):
        """The model's runtime. One CLI call embeds one image: the ONNX export the worker
        (or an earlier call) kept, through ONNX Runtime and without importing torch (2-3 s);
        torch only where none is kept yet. The service's context keeps a session warm."""
        from medsim.model import runtime
        from medsim.model.config import ModelConfig

        if model.id not in self._nets:
            self._nets[model.id] = runtime.for_query(ModelConfig.from_dict(model.config),
                                                     model.checkpoint_sha256(self.owner),
                                                     lambda: model.load(self.owner),
                                                     load_checkpoint=lambda: model.checkpoint(self.owner).checkpoint)
        return self._nets[model.id]

    def embed(self, model: registry.ModelRow, x: np.ndarray) -> np.ndarray:
        """One model input (S, S, 3) uint8 -> its (dim,) float32 vector. A vector with NaN or
        infinite values (an imported encoder on an image unlike its training data; pgvector
        refuses them) is refused in a sentence, not sent to the database."""
        v = self.network(model).embed(x[None])[0]
        if not np.isfinite(v).all():
            raise DataRefused(f"model {model.id} gives NaN or infinite values for this image: it cannot be "
                              f"searched with that model")
        return v

    def stored(self, image_id: int) -> StoredRow | None:
        return one(self.owner, Q.image_pixels_one, {"id": image_id}, as_=StoredRow)

    def faiss(self, model_id: int, splits: tuple = GALLERY_SPLITS):
        """The FAISS index over these splits to search (loaded and checked once per context);
        a build over other splits is refused in a sentence, never searched as if it held them."""
        from medsim.search import faiss_index

        key = (model_id, tuple(splits))
        if key not in self._indexes:
            if self.index_path is not None:
                built = faiss_index.load(self.owner, self.index_path, model_ref=model_id)
                if tuple(built.meta.get("splits", GALLERY_SPLITS)) != tuple(splits):
                    raise BadArgument(f"the FAISS index {self.index_path} holds {', '.join(built.meta['splits'])}, "
                                      f"not {', '.join(splits)}: give splits to match, or another engine")
            else:
                built = faiss_index.load_build(self.owner, faiss_index.latest_build(self.owner, model_id, splits=splits),
                                               model_ref=model_id)
            self._indexes[key] = built
        return self._indexes[key]

    def calibrations(self, model_id: int) -> dict:
        from medsim.training import calibration

        if model_id not in self._cals:
            self._cals[model_id] = calibration.load(self.conn, model_id)
        return self._cals[model_id]

    def not_embedded(self, model_id: int, splits: tuple = GALLERY_SPLITS) -> list[queue.Missing]:
        """Per dataset the connection's role sees: its images in these splits that the model
        has not embedded yet (read once per context, on the searching connection)."""
        key = (model_id, tuple(splits))
        if key not in self._missing:
            self._missing[key] = queue.not_embedded(self.conn, model_id, splits)
        return self._missing[key]

    def selector(self, model_id: int, where: dict, exclude_patient: str | None, splits: tuple = GALLERY_SPLITS):
        """FAISS search parameters allowing only the gallery rows that pass the filter (the
        same rule as medsim.search_gallery), or None when everything may come back."""
        import faiss

        if not where and exclude_patient is None and not self.restricted:
            return None
        key = (model_id, json.dumps(where, sort_keys=True), exclude_patient, tuple(splits))
        if key not in self._selectors:
            ids = np.array([r[0] for r in self.conn.execute(Q.gallery_ids_matching, {
                "model_id": model_id, "filter": Jsonb(where), "exclude_patient": exclude_patient,
                "splits": list(splits)})], np.int64)
            self._selectors[key] = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
        return self._selectors[key]
