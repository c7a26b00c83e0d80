"""The API's resources, each a class whose methods serve both `Client` and `AsyncClient`."""

from visiontune_client.resources.backbones import Backbones
from visiontune_client.resources.datasets import Datasets
from visiontune_client.resources.jobs import Jobs
from visiontune_client.resources.models import Models
from visiontune_client.resources.sweeps import Sweeps
from visiontune_client.resources.webhooks import Webhooks

__all__ = ["Backbones", "Datasets", "Jobs", "Models", "Sweeps", "Webhooks"]
