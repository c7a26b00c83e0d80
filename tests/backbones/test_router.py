"""GET /v1/backbones, in-process: timm's catalogue with its pretrained tags, and whether weights are
on this machine (the local weights directory, ../shared/weights here, then the Hugging Face Hub
cache, which conftest keeps empty for every test)."""

from pathlib import Path

import timm
from huggingface_hub import constants


def backbones(client, **params) -> dict:
    response = client.get("/v1/backbones", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def entry(client, name: str) -> dict:
    return next(b for b in backbones(client, search=name, limit=100)["data"] if b["name"] == name)


def test_search_lists_timm_architectures_and_says_which_have_local_weights(client):
    listing = backbones(client, search="mobilenetv2")
    assert listing["total"] == len(timm.list_models("*mobilenetv2*")) > 1
    assert [b["name"] for b in listing["data"]] == timm.list_models("*mobilenetv2*")

    by_name = {b["name"]: b for b in listing["data"]}
    mobilenet = by_name.pop("mobilenetv2_100")  # mobilenetv2_100.tv_in1k.safetensors is in ../shared/weights
    assert mobilenet["weights_available"] is True and mobilenet["weights_source"] == "local"
    assert mobilenet["pretrained_tags"] == ["ra_in1k"]  # timm's own tags; the local file's tag need not be one
    assert 3_000_000 < mobilenet["num_params"] < 4_000_000 and mobilenet["input_size"] == [3, 224, 224]
    # The other widths have pretrained tags in timm but no file here: listed, and said to have no weights.
    assert by_name and all(b["weights_available"] is False and b["weights_source"] is None for b in by_name.values())
    assert any(b["pretrained_tags"] for b in by_name.values())

    lite = entry(client, "tf_efficientnet_lite0")
    assert lite["weights_available"] is True and lite["weights_source"] == "local"


def test_a_backbone_without_local_weights_says_so(client):
    resnet = entry(client, "resnet18")
    assert {"a1_in1k", "tv_in1k"} <= set(resnet["pretrained_tags"])
    assert resnet["weights_available"] is False and resnet["weights_source"] is None
    assert 11_000_000 < resnet["num_params"] < 12_000_000


def test_weights_in_the_hub_cache_are_found_there(client):
    # What `hf download timm/resnet18.a1_in1k` leaves behind, in this test's own (empty) Hub cache.
    repo = Path(constants.HF_HUB_CACHE) / "models--timm--resnet18.a1_in1k"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model.safetensors").write_bytes(b"not read by a listing")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")

    resnet = entry(client, "resnet18")
    assert resnet["weights_available"] is True and resnet["weights_source"] == "hub-cache"
    # ... and so among those training can start from here (the web console's backbone picker)
    assert "resnet18" in [b["name"] for b in backbones(client, pretrained_here="true", search="resnet")["data"]]


def test_only_those_pretrained_here_here(client):
    """The two files in ../shared/weights, out of the whole zoo; the search narrows them further."""
    listing = backbones(client, pretrained_here="true", limit=100)
    assert listing["total"] == 2
    assert [(b["name"], b["weights_source"]) for b in listing["data"]] == [
        ("mobilenetv2_100", "local"), ("tf_efficientnet_lite0", "local")]
    assert [b["name"] for b in backbones(client, pretrained_here="true", search="lite")["data"]] == ["tf_efficientnet_lite0"]


def test_pages_and_limits(client):
    first, second = backbones(client, limit=5), backbones(client, limit=5, offset=5)
    assert first["total"] == second["total"] == len(timm.list_models()) > 1000
    assert [b["name"] for b in first["data"] + second["data"]] == timm.list_models()[:10]
    assert backbones(client, search="no_such_architecture") == {"total": 0, "data": []}
    assert client.get("/v1/backbones", params={"limit": 101}).status_code == 422
    assert client.get("/v1/backbones", headers={"Authorization": ""}).status_code == 401
