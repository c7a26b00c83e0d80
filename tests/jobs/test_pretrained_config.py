"""A job's model carries its pretrained tag's own config, and the input size it was trained at,
everywhere the preprocessing is resolved: the trainer, the model's `preprocessing`, the artifact's
config.json, serving and the ONNX export. (The general check after every test, in conftest.py,
then runs the served model on the validation images and requires the reported accuracy.)"""

import json

import onnx
import pytest
import timm
from safetensors.torch import save_file

from app.core.config import get_settings
from app.jobs.runner import run_job
from app.ml.backbone import build_model, load_artifact, pixel_transform, preprocessing_of
from app.ml.export import save_artifact
from app.models.runner import run_export
from app.models.service import artifact_dir
from tests.archives import zip_tree
from tests.conftest import HYMENOPTERA, WEIGHTS_DIR
from tests.uploads import upload_ready


@pytest.mark.parametrize(
    ("name", "interpolation", "crop_pct", "input_size"),
    [
        ("resnet18", "bicubic", 0.95, [3, 224, 224]),  # timm's default tag, a1_in1k
        ("resnet18.tv_in1k", "bilinear", 0.875, [3, 224, 224]),
        ("resnet18.a3_in1k", "bicubic", 0.95, [3, 160, 160]),
    ],
)
def test_the_tag_decides_the_preprocessing(name, interpolation, crop_pct, input_size):
    preprocessing = preprocessing_of(build_model(name, 2, weights_file=None))
    assert (preprocessing["interpolation"], preprocessing["crop_pct"], preprocessing["input_size"]) == (
        interpolation, crop_pct, input_size)  # fmt: skip


def test_img_size_is_the_size_the_artifact_serves_at(tmp_path):
    model = build_model("resnet18.tv_in1k", 2, weights_file=None, img_size=192)
    save_artifact(model, tmp_path / "artifact", ["ants", "bees"], {}, 1.0)
    served = load_artifact(tmp_path / "artifact")
    assert preprocessing_of(served) == preprocessing_of(model)
    assert preprocessing_of(served)["input_size"] == [3, 192, 192]
    assert preprocessing_of(served)["interpolation"] == "bilinear"  # the tag's, kept beside the new size
    assert pixel_transform(served).transforms[1].size == (192, 192)  # the centre crop


@pytest.fixture
def tagged_weights(tmp_path, monkeypatch):
    """Weights for a tag timm knows whose preprocessing differs from its architecture's default
    (resnet18.tv_in1k: bilinear, crop 0.875; the default a1_in1k: bicubic, 0.95). Only
    mobilenetv2_100 and tf_efficientnet_lite0 have real weights here (../shared/weights), so this
    file holds timm's random initialisation: it is the tag that is under test, not the weights."""
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    for source in WEIGHTS_DIR.glob("*.safetensors"):
        (weights_dir / source.name).symlink_to(source)
    save_file(timm.create_model("resnet18").state_dict(), weights_dir / "resnet18.tv_in1k.safetensors")
    monkeypatch.setenv("VISIONTUNE_WEIGHTS_DIR", str(weights_dir))
    get_settings.cache_clear()


def test_a_job_serves_and_exports_with_its_tag_and_img_size(client, settings_env, tagged_weights, tmp_path):
    archive = zip_tree(HYMENOPTERA, tmp_path / "small.zip", per_class={"train": 8, "val": 5})
    dataset = upload_ready(client, archive.read_bytes())
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "resnet18.tv_in1k",
                                        "strategy": "linear_probe",
                                        "hyperparameters": {"epochs": 2, "img_size": 160}}).json()  # fmt: skip
    assert run_job(job["id"]).status == "succeeded"
    model_id = client.get(f"/v1/jobs/{job['id']}").json()["model_id"]
    model = client.get(f"/v1/models/{model_id}").json()
    expected = {"interpolation": "bilinear", "crop_pct": 0.875, "input_size": [3, 160, 160]}
    assert {key: model["preprocessing"][key] for key in expected} == expected
    config = json.loads((artifact_dir(get_settings(), model["id"]) / "config.json").read_text())
    assert {key: config["pretrained_cfg"][key] for key in expected} == expected

    export = client.post(f"/v1/models/{model['id']}/exports", json={"format": "onnx"}).json()
    assert run_export(export["id"]) == "ready"
    assert client.get(f"/v1/models/{model['id']}/exports/onnx").json()["parity"]["passed"]
    graph = onnx.load_from_string(client.get(f"/v1/models/{model['id']}/exports/onnx/download").content).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:] == [3, 160, 160]
