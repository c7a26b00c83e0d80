"""GET /v1/models/{ref}/validation-predictions: each validation image of a model's job as its kept
weights predicted it, stored when the job registered the model, named by the paths the dataset's
images endpoint serves, and filtered to the confidently wrong ones.

The models are real linear probes of mobilenetv2 trained in this process by the worker's own code.
Three bee photos are filed under val/ants, so the model has something to be confidently wrong about."""

import io

import pytest
from PIL import Image
from sqlalchemy import update

from app.core.db import session_scope
from app.db.tables import Model
from app.jobs.runner import run_job
from tests.archives import colour_dataset_zip, zip_bytes
from tests.conftest import BOTH_DATABASES, HYMENOPTERA
from tests.tenants.test_tenancy import new_tenant
from tests.uploads import upload_ready

NAME = "pets"
# On SQLite and on a real PostgreSQL server.
pytestmark = pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)


def first(split: str, label: str, n: int, skip: int = 0) -> list:
    return sorted((HYMENOPTERA / split / label).iterdir())[skip : skip + n]


def noisy_archive() -> bytes:
    files = {f"{split}/{label}/{f.name}": f for split, label, n in (("train", "ants", 6), ("train", "bees", 6),
                                                                    ("val", "ants", 4), ("val", "bees", 5))
             for f in first(split, label, n)}  # fmt: skip
    files |= {f"val/ants/{f.name}": f for f in first("val", "bees", 3, skip=5)}  # bees, labelled ants
    return zip_bytes({name: file.read_bytes() for name, file in files.items()})


def train(client, dataset_id: str) -> dict:
    # Default precision: bf16 training features where the CPU has bf16, but the validation features
    # in fp32, as served, so the stored confidences are the served scores.
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100",
                                        "strategy": "linear_probe", "model_name": NAME, "seed": 0,
                                        "hyperparameters": {"epochs": 3}})  # fmt: skip
    assert job.status_code == 202, job.text
    assert run_job(job.json()["id"]).status == "succeeded"
    model_id = client.get(f"/v1/jobs/{job.json()['id']}").json()["model_id"]
    return client.get(f"/v1/models/{model_id}").json()


def test_a_registered_models_predictions_are_stored_and_served(client, settings_env):
    dataset = upload_ready(client, noisy_archive())
    model = train(client, dataset["id"])
    url = f"/v1/models/{model['id']}/validation-predictions"

    everything = client.get(url, params={"limit": 1000}).json()
    assert everything["dataset_id"] == dataset["id"]
    predictions = everything["data"]
    assert len(predictions) == model["metrics"]["val_images"] == 12
    # Every validation image, in the split's order, named as the dataset's images endpoint names it.
    listed = client.get(f"/v1/datasets/{dataset['id']}/images", params={"limit": 200}).json()["data"]
    val = [image for image in listed if image["split"] == "val"]
    assert [(p["path"], p["label"]) for p in predictions] == [(i["path"], i["label"]) for i in val]
    correct = sum(p["predicted"] == p["label"] for p in predictions)
    assert correct == round(model["metrics"]["val_accuracy"] * len(predictions))
    assert all(p["predicted"] in ("ants", "bees") and 0.5 <= p["confidence"] <= 1 for p in predictions)  # two classes
    assert (
        client.get(url).json()["data"] == predictions[:50]
        and len(client.get(url, params={"limit": 5}).json()["data"]) == 5
    )

    wrong = client.get(url, params={"wrong": "true", "limit": 12}).json()["data"]
    assert wrong, "the bees filed under ants were all called ants"
    assert all(p["label"] != p["predicted"] for p in wrong)
    assert [p["confidence"] for p in wrong] == sorted((p["confidence"] for p in wrong), reverse=True)
    assert sorted(p["path"] for p in wrong) == sorted(p["path"] for p in predictions if p["label"] != p["predicted"])
    assert client.get(url, params={"wrong": "true", "limit": 1}).json()["data"] == wrong[:1]
    assert client.get(url, params={"wrong": "false", "limit": 1000}).json() == everything

    # Each path is one of the dataset's images, and the served model says of it what is stored.
    for prediction in predictions:
        thumbnail = client.get(f"/v1/datasets/{dataset['id']}/images/{prediction['path']}", params={"size": 32})
        assert thumbnail.status_code == 200 and max(Image.open(io.BytesIO(thumbnail.content)).size) <= 32
    (stored,) = (settings_env / "datasets").iterdir()
    files = [("files", (p["path"], (stored / p["path"]).read_bytes())) for p in predictions]
    served = client.post(f"/v1/models/{model['id']}/predict", files=files, params={"top_k": 1}).json()["predictions"]
    for prediction, answer in zip(predictions, served, strict=True):
        top = answer["labels"][0]
        assert top["label"] == prediction["predicted"] and abs(top["score"] - prediction["confidence"]) < 1e-3, prediction

    # The model's other names answer the same; the model itself is described as before.
    assert client.put(f"/v1/models/{NAME}/aliases/production", json={"version": 1}).status_code == 200
    for ref in (f"{NAME}@1", f"{NAME}@production"):
        assert client.get(f"/v1/models/{ref}/validation-predictions", params={"limit": 1000}).json() == everything
    assert "validation" not in client.get(f"/v1/models/{model['id']}").json()

    for bad in ({"limit": 0}, {"limit": 1001}, {"wrong": "maybe"}):
        response = client.get(url, params=bad)
        assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error", bad
    _, other = new_tenant(client, "other", scopes=("read",))
    for ref in (model["id"], f"{NAME}@1"):
        response = client.get(f"/v1/models/{ref}/validation-predictions", headers=other)
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"

    # A model registered before they were kept has none.
    with session_scope() as session:
        session.execute(update(Model).where(Model.id == model["id"]).values(validation=None))
    assert client.get(url, params={"wrong": "true"}).json() == {"dataset_id": dataset["id"], "data": []}


def test_a_stratified_hold_out_names_train_paths(client):
    """A dataset without a val/ split: the job holds out some of its train/ images, named so."""
    dataset = upload_ready(client, colour_dataset_zip(n=6))
    model = train(client, dataset["id"])
    predictions = client.get(f"/v1/models/{model['id']}/validation-predictions").json()["data"]
    assert len(predictions) == model["metrics"]["val_images"] > 0
    assert all(p["path"].startswith(f"train/{p['label']}/") for p in predictions)
    listed = {
        i["path"] for i in client.get(f"/v1/datasets/{dataset['id']}/images", params={"limit": 200}).json()["data"]
    }
    assert {p["path"] for p in predictions} <= listed
