"""Python client for the VisionTune API.

from visiontune_client import Client

with Client() as client:  # VISIONTUNE_API_URL, VISIONTUNE_API_KEY
    dataset = client.datasets.wait(client.datasets.upload("photos/").id)
    job = client.jobs.create(dataset.id, backbone="mobilenetv2_100").wait(progress=True)
    print(client.models.predict(job.model_id, "cat.jpg").predictions[0].label)
"""

from visiontune_client._http import VERSION as __version__
from visiontune_client.client import AsyncClient, Client
from visiontune_client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuditFailedError,
    AuthenticationError,
    ConflictError,
    DatasetFailedError,
    ExportFailedError,
    InvalidDatasetError,
    JobCancelledError,
    JobFailedError,
    MissingAPIKeyError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    ValidationError,
    VisionTuneError,
    WaitTimeoutError,
)
from visiontune_client.types import (
    Alias,
    Audit,
    Backbone,
    Dataset,
    Delivery,
    Embeddings,
    Event,
    Export,
    Job,
    Me,
    Model,
    Predictions,
    Progress,
    Sweep,
    Webhook,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "Alias",
    "AsyncClient",
    "Audit",
    "AuditFailedError",
    "AuthenticationError",
    "Backbone",
    "Client",
    "ConflictError",
    "Dataset",
    "DatasetFailedError",
    "Delivery",
    "Embeddings",
    "Event",
    "Export",
    "ExportFailedError",
    "InvalidDatasetError",
    "Job",
    "JobCancelledError",
    "JobFailedError",
    "Me",
    "MissingAPIKeyError",
    "Model",
    "NotFoundError",
    "OperationFailedError",
    "PermissionDeniedError",
    "Predictions",
    "Progress",
    "RateLimitError",
    "ServiceUnavailableError",
    "Sweep",
    "ValidationError",
    "VisionTuneError",
    "WaitTimeoutError",
    "Webhook",
    "__version__",
]
