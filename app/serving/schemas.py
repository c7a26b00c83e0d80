"""Prediction and embedding requests and answers."""

from typing import Any

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field


class Base64Image(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    filename: str = Field("image", max_length=255)
    data: Base64Bytes = Field(description="The image file's bytes, base64-encoded.")


class ImagesBody(BaseModel):
    """The JSON alternative to a multipart upload of `files`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    images: list[Base64Image] = Field(min_length=1)


class LabelScore(BaseModel):
    label: str
    score: float


class ImagePrediction(BaseModel):
    filename: str
    labels: list[LabelScore] | None = Field(description="Null when the top score is under `threshold` (abstain).")


class PredictionResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    predictions: list[ImagePrediction]


class ImageEmbedding(BaseModel):
    filename: str
    embedding: list[float]


class EmbeddingResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    dimensions: int
    embeddings: list[ImageEmbedding]


def _inline_refs(schema: dict) -> dict:
    """Pydantic's schema with its local `$defs` substituted in place: `openapi_extra` is copied into
    the OpenAPI document as is, where `#/$defs/...` would not resolve."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    return walk(schema)


# The request body of predict and embed, for the OpenAPI document (the body is parsed by
# app.serving.service.read_images under its own limits, not by FastAPI).
IMAGES_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "application/json": {"schema": _inline_refs(ImagesBody.model_json_schema())},
            "image/*": {"schema": {"type": "string", "format": "binary"}},  # one image, the raw body
        },
    }
}
