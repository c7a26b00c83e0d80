"""Sweep validation, in-process: a bad sweep is refused whole, with nothing queued."""

from tests.archives import colour_dataset_zip
from tests.uploads import upload_ready


def test_unknown_backbone_refuses_the_whole_sweep(client):
    dataset_id = upload_ready(client, colour_dataset_zip(), "colors.zip")["id"]
    response = client.post("/v1/sweeps", json={"dataset_id": dataset_id, "backbones": ["mobilenetv2_100", "resnet5"]})
    assert response.status_code == 422 and "resnet50" in response.json()["error"]["message"]
    assert client.get("/v1/jobs").json()["data"] == [] and client.get("/v1/sweeps").json()["data"] == []

    duplicate = client.post("/v1/sweeps", json={"dataset_id": dataset_id, "backbones": ["resnet18", "resnet18"]})
    assert duplicate.status_code == 422 and "distinct" in duplicate.json()["error"]["message"]

    sweep = client.post("/v1/sweeps", json={"dataset_id": dataset_id, "backbones": ["mobilenetv2_100", "resnet18"]})
    assert sweep.status_code == 202
    body = sweep.json()
    assert body["status"] == "queued" and [r["status"] for r in body["rows"]] == ["queued", "queued"]
    assert all(job["strategy"] == "linear_probe" for job in client.get("/v1/jobs").json()["data"])
    not_in_sweep = client.post(f"/v1/sweeps/{body['id']}/promote", json={"backbone": "resnet50"})
    assert not_in_sweep.status_code == 422 and not_in_sweep.json()["error"]["code"] == "backbone_not_in_sweep"


def test_unknown_sweep_is_404(client):
    assert client.get(f"/v1/sweeps/sweep_{'0' * 24}").json()["error"]["code"] == "sweep_not_found"
