"""The HTTP API's request and response shapes (pydantic): they validate requests and become
the OpenAPI schema at /docs. Unknown fields are refused."""

from __future__ import annotations

from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, Json

from medsim.search import ENGINES, MAX_K
from medsim.search.pipeline import Result
from medsim.search.request import MAX_ID

FILTERS_HELP = ('only neighbours matching: {"dataset": ..., "label": [...], "split": "train"|"val"|"test", '
                '"modality": ..., any metadata key}')


BOX_HELP = ("search with a region of the query: [x0, y0, x1, y1] in the query's own pixels (x1, y1 excluded), "
            "resized to the model's input like a whole image")


class SearchOptions(BaseModel):
    """How to search: the same for every kind of query."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(4, ge=1, le=MAX_K, description="neighbours to return")
    engine: Literal[ENGINES] = Field("pgvector", description="pgvector (HNSW), exact (pgvector, no index) "
                                                             "or faiss (the model's latest FAISS build)")
    include_own_patient: bool = Field(False, description="also return other images of the query's patient")
    per_patient: int | None = Field(None, ge=1, le=MAX_K, description="at most this many neighbours per patient")
    max_distance: float | None = Field(None, ge=0, description="drop neighbours farther than this")
    model: int | None = Field(None, ge=1, le=2**31 - 1, description="a model id (default: the current model)")
    splits: str | None = Field(None, max_length=40, description="the splits to search among, comma-separated: "
                                                                "train,val,test (the default: every image on "
                                                                "file), train,val, or train (the evaluation protocol)")
    coverage: float = Field(0.9, ge=0.5, le=0.99, description="the diagnosis set's coverage: the probability that "
                                                             "the query's label is in it (the nearest fitted level "
                                                             "at or above is used and returned)")


class SearchRequest(SearchOptions):
    """A JSON search: exactly one of `image_id` (a stored image), `vector` (a raw
    embedding of the model's dimension) or `upload` (the handle of an upload the service
    kept). Uploads themselves go to POST /search/upload."""

    image_id: int | None = Field(None, ge=1, le=MAX_ID, description="a stored image to search from")
    upload: str | None = Field(None, max_length=64, description="the handle POST /search/upload returned")
    box: list[int] | None = Field(None, description=BOX_HELP)
    vector: list[float] | None = Field(None, description="a raw embedding of the model's dimension")
    filters: dict[str, str | list[str]] = Field(default_factory=dict, description=FILTERS_HELP)


class SearchUpload(SearchOptions):
    """A multipart search: the image file in the field `image`, options as form fields
    (`filters` as a JSON object in a string)."""

    image: UploadFile = Field(description="PNG, JPEG, TIFF, BMP, GIF, WebP or DICOM (recognised by content)")
    filters: Json[dict[str, str | list[str]]] | None = Field(None, description=FILTERS_HELP + ", as JSON")
    # a string parsed by the route: FastAPI collects a list-typed form field as repeated fields
    box: str | None = Field(None, max_length=100, description=BOX_HELP + ", as JSON, e.g. [0, 0, 14, 14]")


class Neighbour(BaseModel):
    rank: int
    image_id: int
    dataset: str
    split: str
    label_name: str = Field(description="for display; label_names holds the names themselves")
    label_names: list[str]
    distance: float
    p_same: float | None = Field(description="calibrated probability that it shares the query's diagnosis "
                                             "(fitted by `medsim evaluate` on validation pairs); None if not "
                                             "fitted, where its label is known to differ from the query's "
                                             "(same_label false) and for a query unlike anything on file")
    same_label: bool | None = Field(description="it has the query's label, in the query's dataset (None: the "
                                                "query has no label)")
    patient_key: str | None
    study_id: str | None
    thumbnail_url: str
    viewer_url: str | None = Field(None, description="its study in the PACS's own viewer, for an image a PACS sync "
                                                     "stored (shown to tokens with the images scope)")


class QueryInfo(BaseModel):
    kind: Literal["image_id", "upload", "vector"]
    label: str
    image_id: int | None = Field(description="the stored image the query is (by id, or by identical pixels)")
    dataset: str | None
    label_name: str | None
    label_names: list[str]
    in_gallery: list[int]
    handle: str | None = Field(None, description="an upload kept by the service: search it again with "
                                                 "{\"upload\": handle}, preview it at preview_url, open "
                                                 "/?upload=handle again (the uploader's own token only)")
    preview_url: str | None = None
    size: list[int] | None = Field(None, description="[width, height] of the query image, where it was decoded "
                                                     "(an upload): a box is in these pixels")


class Vote(BaseModel):
    dataset: str
    label_name: str | None = Field(description="the label most neighbours carry; null for a tie")
    tie: list[str] | None = Field(None, description="the labels tied for the most votes (each has `votes` of `of`): "
                                                    "no single label and no probability are claimed")
    votes: int
    of: int
    share: float
    confidence: float | None = Field(description="calibrated probability that the vote is the query's label, "
                                                 "fitted on validation queries at this many neighbours (the "
                                                 "nearest grid k); null where none holds, said why below")
    calibrated_at_k: int | None
    unlike_anything_on_file: bool = Field(False, description="the nearest neighbour is farther than 99% of "
                                                             "validation queries' and training images' "
                                                             "nearest: no vote probability")
    no_confidence_because: str | None = None


class DiagnosisSet(BaseModel):
    labels: list[str] = Field(description="the labels that hold the query's with probability `coverage` (split "
                                          "conformal over the neighbours' labels, fitted on validation queries); "
                                          "one label is the confident case, every label an honest 'cannot tell'")
    coverage: float = Field(description="the level the set holds at: the nearest fitted one at or above the asked")
    of: list[str] = Field(description="every label of the dataset")
    calibrated_at_k: int
    method: str = Field(description="mondrian (one threshold per true label: unbalanced classes) or marginal")


class ModelBrief(BaseModel):
    id: int
    name: str
    embedding_dim: int


class SearchResponse(BaseModel):
    model: ModelBrief
    engine: str
    index_build: int | None = Field(description="the FAISS build that answered (engine faiss)")
    query: QueryInfo
    vote: Vote | None = Field(None, description="the label the neighbours vote for")
    diagnosis_set: DiagnosisSet | None = Field(None, description="the labels that hold the query's at a stated "
                                                                 "coverage; null where none is fitted or the "
                                                                 "query is unlike anything on file")
    calibration_note: str | None = Field(None, description="'DATASET: not verified on recent images: ...' where "
                                                           "the latest `medsim calibration check` of the vote's "
                                                           "dataset found the set covering less than asked; "
                                                           "null where it passed or was never run")
    neighbours: list[Neighbour]
    notes: list[str]
    timing_ms: float

    @classmethod
    def of(cls, r: Result, timing_ms: float, handle: str | None = None) -> SearchResponse:
        q = r.query
        return cls(model=ModelBrief(id=r.model.id, name=r.model.name, embedding_dim=r.model.embedding_dim),
                   engine=r.engine, index_build=r.index_build,
                   query=QueryInfo(kind=q.kind, label=q.label, image_id=q.image_id, dataset=q.dataset,
                                   label_name=q.label_name, label_names=q.label_names, in_gallery=q.in_gallery,
                                   handle=handle, preview_url=f"/uploads/{handle}/preview.png" if handle else None,
                                   size=[int(q.pixels.shape[1]), int(q.pixels.shape[0])]
                                   if q.pixels is not None else None),
                   vote=q.vote, diagnosis_set=q.diagnosis_set,
                   calibration_note=q.calibration_note, notes=r.notes, timing_ms=round(timing_ms, 3),
                   neighbours=[Neighbour(rank=i, thumbnail_url=f"/images/{h.image_id}/thumbnail.png",
                                         **{k: v for k, v in vars(h).items()})
                               for i, h in enumerate(r.hits, 1)])


class Me(BaseModel):
    """GET /me: who a token is (the page's sign-in)."""

    name: str
    scope: Literal["search", "images", "admin"]
    sees_all: bool = Field(description="granted every dataset")
    granted: bool = Field(description="granted any dataset at all")
    datasets: list[str] = Field(description="the datasets this user sees")
    notice: str | None = Field(None, description="what the user must know at sign-in: no dataset granted yet, "
                                                 "and the command that grants one")


class ErrorBody(BaseModel):
    error: str
    detail: str


ERRORS = {s: {"model": ErrorBody} for s in (400, 404, 409, 413, 422, 503)}


class DatasetFigures(BaseModel):
    """One model on one dataset (medsim.training.compare.DatasetFigures); null: not measured."""

    dataset: str
    images: int = Field(description="images of the dataset on file")
    embedded: int = Field(description="of those, embedded for this model")
    coverage: float = Field(description="embedded / images")
    map5: float | None = Field(description="mAP@5 (AP@5 over the hits in the top 5), the latest stored evaluation")
    acc1: float | None = Field(description="ACC@1, the same evaluation")
    queries: int | None = Field(description="test queries behind map5 and acc1")
    evaluation_id: int | None = Field(description="the medsim.evaluations row they come from")
    ece: float | None = Field(description="test ECE of the stored calibration's P(same | distance)")
    vote_ece: float | None = Field(description="test ECE of the stored calibration's P(the vote is right)")


class ModelFigures(BaseModel):
    id: int
    name: str
    is_current: bool
    datasets: list[str] = Field(description="trained on")
    input_size: int | None = Field(description="the model's input size (its config's image_size), px")
    checkpoint_bytes: int
    ms_per_image: float | None = Field(description="embedding time per image (null: not measured)")
    runtime: str | None = Field(description="the runtime that was timed: onnx or torch")
    by_dataset: list[DatasetFigures]


class ModelComparison(BaseModel):
    """GET /models/compare: what `medsim models compare` prints."""

    models: list[ModelFigures]
    timing: str | None = Field(description="how ms_per_image was measured (null: not measured)")
    not_evaluable: dict[str, str] = Field(description="datasets no model can be evaluated on, and why")
    to_fill: list[str] = Field(description="the `medsim evaluate` commands that fill the missing figures")
