"""What the API returns, as frozen dataclasses: the main fields as attributes, and `raw`, the whole
JSON object, so that fields the server adds later are never lost. Missing fields read as None."""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, ClassVar, Self

from visiontune_client.streams import ServerSentEvent


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _build(cls: Any, raw: Mapping[str, Any], **parsed: Any) -> Any:
    """`cls` from a JSON object: each field from the key of its name (`*_at` keys as datetimes),
    except those given in `parsed`; `raw` gets the object itself."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in parsed:
            values[f.name] = parsed[f.name]
        elif f.name == "raw":
            values["raw"] = dict(raw)
        elif f.name.endswith("_at"):
            values[f.name] = _time(raw.get(f.name))
        else:
            values[f.name] = raw.get(f.name)
    return cls(**values)


def _raw() -> Any:
    return field(default_factory=dict, repr=False, compare=False)


class _FromJSON:
    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Self:
        return _build(cls, raw, **cls._nested(raw))

    @classmethod
    def _nested(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The fields that are not taken as they are from the key of their name."""
        return {}


@dataclass(frozen=True)
class ErrorInfo:
    """Why work failed: on a failed dataset, job, export or audit."""

    code: str
    message: str
    details: list[Any] | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> Self | None:
        return None if raw is None else _build(cls, raw)


@dataclass(frozen=True)
class ClassCount:
    name: str
    train: int
    val: int


@dataclass(frozen=True)
class Dataset(_FromJSON):
    id: str
    name: str
    status: str  # processing, ready, failed
    num_images: int
    classes: list[ClassCount]
    has_val_split: bool
    size_bytes: int
    warnings: list[str]
    error: ErrorInfo | None
    created_at: datetime | None
    finished_at: datetime | None
    raw: dict[str, Any] = _raw()

    @classmethod
    def _nested(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        classes = [_build(ClassCount, c) for c in raw.get("classes") or []]
        return {"classes": classes, "error": ErrorInfo.parse(raw.get("error"))}


@dataclass(frozen=True)
class _Work(_FromJSON):
    """What a worker builds in the background has: its status (processing, ready, failed), the
    error when it failed, and when it was asked for and finished."""

    status: str
    error: ErrorInfo | None
    created_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def _nested(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {"error": ErrorInfo.parse(raw.get("error"))}


@dataclass(frozen=True)
class Audit(_Work):
    id: str
    dataset_id: str
    backbone: str
    result: dict[str, Any] | None
    raw: dict[str, Any] = _raw()


@dataclass(frozen=True)
class Progress(_FromJSON):
    phase: str  # queued, searching, preparing, features, training, validation, paused, or the final status
    epoch: int
    epochs: int
    step: int | None
    steps: int | None
    images_per_second: float | None
    eta_seconds: float | None
    queue_position: int | None


@dataclass(frozen=True)
class Job(_FromJSON):
    id: str
    status: str  # queued, running, paused, succeeded, failed, cancelled
    dataset_id: str | None
    backbone: str
    strategy: str
    model_name: str | None
    model_id: str | None
    progress: Progress
    metrics: dict[str, Any]
    error: ErrorInfo | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    raw: dict[str, Any] = _raw()
    _jobs: ClassVar[Any] = None  # the Jobs resource that answered it, for wait(): not a field

    @classmethod
    def _nested(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {"progress": Progress.from_json(raw.get("progress") or {}), "error": ErrorInfo.parse(raw.get("error"))}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], jobs: Any = None) -> Self:
        job = super().from_json(raw)
        object.__setattr__(job, "_jobs", jobs)
        return job

    def wait(self, progress: bool = False, timeout: float | None = None) -> "Job":
        """Follow the job's events until it ends and return it refreshed (see `Jobs.wait`)."""
        return self._jobs.wait(self.id, progress=progress, timeout=timeout)


@dataclass(frozen=True)
class Event(_FromJSON):
    """A job event. Stored events have an `id`; a stream also has `progress` events (data: the
    progress) and a last `end` event (data: `{"status": ...}`), without ids."""

    id: int | None
    type: str
    message: str
    data: dict[str, Any]
    created_at: datetime | None
    raw: dict[str, Any] = _raw()

    @classmethod
    def from_sse(cls, sse: ServerSentEvent) -> Self:
        payload = json.loads(sse.data) if sse.data else {}
        if sse.id is not None:
            return cls.from_json(payload)
        return cls(id=None, type=sse.event, message="", data=payload, created_at=None, raw=payload)


@dataclass(frozen=True)
class Model(_FromJSON):
    id: str
    name: str
    version: int
    aliases: list[str]
    job_id: str
    dataset_id: str
    backbone: str
    strategy: str | None  # linear_probe, partial, full or lp_ft (None from servers before it was reported)
    classes: list[str]
    metrics: dict[str, Any]
    size_bytes: int
    created_at: datetime | None
    raw: dict[str, Any] = _raw()


@dataclass(frozen=True)
class Export(_Work):
    id: str
    model_id: str
    format: str
    size_bytes: int
    parity: dict[str, Any] | None
    raw: dict[str, Any] = _raw()


@dataclass(frozen=True)
class Alias(_FromJSON):
    name: str
    alias: str
    version: int
    model_id: str


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class Prediction:
    """One image's labels, best first; `labels` is None when the model abstained (`threshold`)."""

    filename: str
    labels: list[LabelScore] | None

    @property
    def label(self) -> str | None:
        return self.labels[0].label if self.labels else None

    @property
    def score(self) -> float | None:
        return self.labels[0].score if self.labels else None


@dataclass(frozen=True)
class Predictions(_FromJSON):
    model_id: str  # the model that answered (what an alias pointed to)
    predictions: list[Prediction]
    raw: dict[str, Any] = _raw()

    @classmethod
    def _nested(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        predictions = [
            Prediction(p["filename"], None if p.get("labels") is None else [_build(LabelScore, s) for s in p["labels"]])
            for p in raw.get("predictions") or []
        ]
        return {"predictions": predictions}


@dataclass(frozen=True)
class Embedding:
    filename: str
    embedding: list[float]


@dataclass(frozen=True)
class Embeddings(_FromJSON):
    model_id: str
    dimensions: int
    embeddings: list[Embedding]
    raw: dict[str, Any] = _raw()

    @classmethod
    def _nested(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {"embeddings": [_build(Embedding, e) for e in raw.get("embeddings") or []]}


@dataclass(frozen=True)
class SweepRow:
    rank: int | None  # 1: best validation accuracy; None until the row succeeded
    backbone: str
    job_id: str
    status: str
    val_accuracy: float | None
    macro_f1: float | None
    seconds: float | None
    model_id: str | None
    error: str | None


@dataclass(frozen=True)
class Sweep(_FromJSON):
    id: str
    dataset_id: str | None
    status: str  # queued, running, finished
    rows: list[SweepRow]
    created_at: datetime | None
    raw: dict[str, Any] = _raw()

    @classmethod
    def _nested(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {"rows": [_build(SweepRow, r) for r in raw.get("rows") or []]}


@dataclass(frozen=True)
class Backbone(_FromJSON):
    name: str
    pretrained_tags: list[str]
    num_params: int
    input_size: list[int]
    weights_available: bool
    raw: dict[str, Any] = _raw()


@dataclass(frozen=True)
class Me(_FromJSON):
    """The calling key and its tenant: quotas (`limits` in force) and `usage`."""

    tenant_id: str
    tenant_name: str
    key_id: str
    key_name: str
    scopes: list[str]
    limits: dict[str, Any]
    usage: dict[str, Any]
    raw: dict[str, Any] = _raw()

    @classmethod
    def _nested(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        tenant, key = raw.get("tenant") or {}, raw.get("key") or {}
        return {
            "tenant_id": tenant.get("id"), "tenant_name": tenant.get("name"), "limits": tenant.get("limits"),
            "usage": tenant.get("usage"), "key_id": key.get("id"), "key_name": key.get("name"),
            "scopes": key.get("scopes"),
        }  # fmt: skip


@dataclass(frozen=True)
class Webhook(_FromJSON):
    id: str
    url: str
    events: list[str]
    description: str | None
    secret: str | None = field(repr=False)  # only in the answer that created it
    created_at: datetime | None
    raw: dict[str, Any] = _raw()


@dataclass(frozen=True)
class Delivery(_FromJSON):
    """One event sent (or being sent) to a webhook; `log` has each attempt."""

    id: str
    webhook_id: str
    event: str
    status: str  # pending, sending, succeeded, failed
    attempts: int
    log: list[dict[str, Any]]
    payload: dict[str, Any]
    created_at: datetime | None
    next_attempt_at: datetime | None
    finished_at: datetime | None
    raw: dict[str, Any] = _raw()
