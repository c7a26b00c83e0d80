"""`VISIONTUNE_SERVING_DECODE=device` (app/serving/device_decode.py): prediction JPEGs decoded in
batches where the model runs. On this CPU machine that is torchvision's libjpeg-turbo decoder; on a
GPU machine the same tests run nvjpeg. Real photos throughout; the files Pillow must keep (rotated,
CMYK, corrupt) are made from a real photo, as no real file of each kind is in ../shared."""

import asyncio
import io

import anyio
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms

from app.core import metrics
from app.core.config import Settings
from app.jobs.runner import run_job
from app.ml.backbone import pixel_bytes
from app.ml.export import save_artifact
from app.serving import device_decode, service
from app.serving.device_decode import DeviceUndecodable, EncodedJpeg
from app.serving.inference_process import InferenceProcesses
from app.serving.predictor import ModelCache, preprocess, serving_device
from app.serving.remote import InferenceClient, RemoteModels
from tests.archives import zip_tree
from tests.conftest import HYMENOPTERA, MOBILENET_WEIGHTS
from tests.uploads import upload_ready

MAX_PIXELS = 10**8
PHOTOS = [(p.name, p.read_bytes()) for label in ("ants", "bees") for p in sorted((HYMENOPTERA / "val" / label).iterdir())]
NEVER_MS = 60_000  # a batching window no test outlives: a batch expected full fills long before it closes


@pytest.fixture(scope="module")
def imagenet_artifact(tmp_path_factory):
    """mobilenetv2_100 with its real ImageNet classifier: over 1000 classes, agreeing on the top one
    is a far stricter check than over ants and bees."""
    model = timm.create_model("mobilenetv2_100", pretrained=True, pretrained_cfg_overlay={"file": str(MOBILENET_WEIGHTS)})
    directory = tmp_path_factory.mktemp("imagenet") / "model"
    save_artifact(model, directory, [f"class {i}" for i in range(1000)], {}, temperature=1.0)
    return directory


def _loaded(artifact, max_batch_size=8):
    return ModelCache(10**12, max_batch_size, NEVER_MS, "torch", serving_device("auto")).get("m", artifact, {})


def _broken(data: bytes) -> bytes:
    """A JPEG whose header reads but whose compressed data is damaged halfway (from a real photo)."""
    middle = len(data) // 2
    return data[:middle] + b"\xff" * 2000 + data[middle + 2000 :]


def _saved(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def test_real_photos_decode_within_a_level_of_pillow_and_to_the_same_top1_class(imagenet_artifact):
    loaded = _loaded(imagenet_artifact)
    pillow = preprocess(loaded, PHOTOS, MAX_PIXELS)
    jpegs = preprocess(loaded, PHOTOS, MAX_PIXELS, jpegs=True)
    assert isinstance(jpegs, list) and all(isinstance(j, EncodedJpeg) for j in jpegs)  # every val photo qualifies

    decoded = device_decode.decode(jpegs, loaded.decode_steps, loaded.device)
    assert all(p.dtype == torch.uint8 and p.device.type == loaded.device.type for p in decoded)
    levels = torch.stack([(p.cpu().float() - q * 255).abs().mean() for p, q in zip(decoded, pillow, strict=True)])
    assert levels.max() < 1.0, f"pixels differ from Pillow's by up to {levels.max():.2f} levels on average"

    expected = loaded.probabilities(pillow)
    served = torch.stack(loaded.forward(jpegs))
    agreement = (served.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement >= 0.99, f"top-1 agreement with Pillow's pixels {agreement:.3f} over {len(PHOTOS)} photos"
    assert (served - expected).abs().max() < 0.1  # calibrated probabilities close, over 1000 classes


def test_what_the_device_would_decode_differently_stays_with_pillow():
    photo = Image.open(io.BytesIO(PHOTOS[0][1]))
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: Pillow turns the pixels upright, the device's decoder would not
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert device_decode.plain_jpeg(PHOTOS[0][1], MAX_PIXELS)
    assert device_decode.plain_jpeg(_saved(photo.convert("L")), MAX_PIXELS)  # greyscale: both make RGB of it
    assert not device_decode.plain_jpeg(_saved(photo, exif=exif), MAX_PIXELS)
    assert not device_decode.plain_jpeg(_saved(photo.convert("CMYK")), MAX_PIXELS)
    assert not device_decode.plain_jpeg(png.getvalue(), MAX_PIXELS)
    assert not device_decode.plain_jpeg(PHOTOS[0][1], photo.width * photo.height - 1)  # over the pixel limit: its 400
    assert not device_decode.plain_jpeg(b"not an image", MAX_PIXELS)

    # timm's 'border' crop mode pads with the mean colour, on PIL images only: such models keep Pillow.
    def pixel_steps(crop_mode):
        transform = create_transform(input_size=(3, 224, 224), crop_mode=crop_mode, crop_pct=0.875, is_training=False)
        return device_decode.tensor_steps(transforms.Compose([*transform.transforms[:-2], pixel_bytes]))

    assert pixel_steps("center") is not None and pixel_steps("squash") is not None
    assert pixel_steps("border") is None


def test_one_photo_not_a_plain_jpeg_keeps_the_whole_request_with_pillow(imagenet_artifact):
    loaded = _loaded(imagenet_artifact)
    png = io.BytesIO()
    Image.open(io.BytesIO(PHOTOS[1][1])).save(png, "PNG")
    batch = preprocess(loaded, [PHOTOS[0], ("b.png", png.getvalue())], MAX_PIXELS, jpegs=True)
    assert isinstance(batch, torch.Tensor) and torch.equal(batch[1], preprocess(loaded, PHOTOS[1:2], MAX_PIXELS)[0])


def test_a_jpeg_the_device_refuses_fails_its_own_request_and_not_its_batch(imagenet_artifact):
    loaded = _loaded(imagenet_artifact, max_batch_size=3)
    good, broken = EncodedJpeg(PHOTOS[0][1]), EncodedJpeg(_broken(PHOTOS[1][1]))
    pixels = preprocess(loaded, PHOTOS[2:3], MAX_PIXELS)  # a Pillow-decoded request shares the batch

    async def scenario():
        return await asyncio.gather(
            loaded.submit([good]), loaded.submit([broken]), loaded.submit(pixels), return_exceptions=True
        )

    answered, refused, other = asyncio.run(scenario())
    assert isinstance(refused, DeviceUndecodable)
    assert answered[1] == 3 and other[1] == 3  # one batch: decoded JPEG, refused JPEG and pixels together
    alone = torch.stack(loaded.forward([good]))
    assert torch.allclose(answered[0], alone, atol=1e-5) and torch.equal(answered[0].argmax(1), alone.argmax(1))
    assert torch.allclose(other[0], loaded.probabilities(pixels), atol=1e-5)


def test_the_inference_process_decodes_the_jpegs_it_is_sent_and_names_one_it_refuses(imagenet_artifact, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_MAX_WAIT_MS", str(NEVER_MS))
    monkeypatch.setenv("VISIONTUNE_MAX_BATCH_SIZE", "4")
    processes = InferenceProcesses([None] if serving_device("auto") == "cpu" else ["0"])
    try:
        processes.wait_ready()
        models = RemoteModels(InferenceClient(processes.sockets[0]), "torch")

        async def scenario():
            remote = await anyio.to_thread.run_sync(models.get, "m", imagenet_artifact, {})
            sent = preprocess(remote, PHOTOS[:4], MAX_PIXELS, jpegs=True)
            rows, batch = await remote.submit(sent)  # (full batches throughout: no window to wait out)
            with pytest.raises(DeviceUndecodable):
                await remote.submit([*sent[:3], EncodedJpeg(_broken(PHOTOS[0][1]))])
            again, _ = await remote.submit(sent)  # the process serves on
            return sent, rows, batch, again

        sent, rows, batch, again = asyncio.run(scenario())
    finally:
        processes.stop()
    assert isinstance(sent, list) and batch == 4
    local = torch.stack(_loaded(imagenet_artifact).forward(sent))
    assert torch.allclose(rows, local, atol=1e-4) and torch.equal(rows.argmax(1), local.argmax(1))
    assert torch.equal(rows, again)


def test_over_http_jpegs_are_decoded_where_the_model_runs_and_bad_ones_answer_as_without_it(
    client, tmp_path, monkeypatch
):
    archive = zip_tree(HYMENOPTERA, tmp_path / "small.zip", per_class={"train": 8, "val": 4})
    dataset = upload_ready(client, archive.read_bytes(), "small.zip")
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100",
                                        "strategy": "linear_probe", "hyperparameters": {"epochs": 2}}).json()  # fmt: skip
    assert run_job(job["id"]).status == "succeeded"
    model_id = client.get(f"/v1/jobs/{job['id']}").json()["model_id"]
    settings = client.app.state.serving.settings

    def predict(data: bytes, content_type: str = "image/jpeg"):
        return client.post(f"/v1/models/{model_id}/predict", content=data, headers={"Content-Type": content_type})

    def device_decoded() -> float:
        return metrics.DEVICE_DECODED_IMAGES._value.get()

    photos = PHOTOS[:3] + PHOTOS[-3:]
    monkeypatch.setattr(settings, "serving_decode", "api")
    by_pillow = [predict(data).json() for _, data in photos]
    broken_by_pillow = predict(_broken(PHOTOS[0][1]))
    monkeypatch.setattr(settings, "serving_decode", "device")
    before = device_decoded()
    on_device = [predict(data).json() for _, data in photos]
    assert device_decoded() - before == len(photos)
    for a, b in zip(by_pillow, on_device, strict=True):
        assert a["predictions"][0]["labels"][0]["label"] == b["predictions"][0]["labels"][0]["label"]
        assert abs(a["predictions"][0]["labels"][0]["score"] - b["predictions"][0]["labels"][0]["score"]) < 0.02

    broken = predict(_broken(PHOTOS[0][1]))  # refused by the device, then by Pillow: its usual 415
    assert broken.status_code == broken_by_pillow.status_code == 415
    assert broken.json() == broken_by_pillow.json() and broken.json()["error"]["code"] == "invalid_image"
    png = io.BytesIO()
    Image.open(io.BytesIO(PHOTOS[0][1])).save(png, "PNG")
    before = device_decoded()
    assert predict(png.getvalue(), "image/png").status_code == 200 and device_decoded() == before  # Pillow's
    assert predict(PHOTOS[0][1]).status_code == 200  # and the server serves on


def test_auto_decodes_on_the_device_where_an_inference_process_runs_the_model_on_a_gpu(tmp_path, monkeypatch):
    """`VISIONTUNE_SERVING_DECODE=auto` (the default), as each API process resolves it. A GPU is
    faked (this machine has none): nothing here touches it, and no socket is connected."""

    def decodes_on_device(**settings) -> bool:
        return service.Serving(Settings(data_dir=tmp_path, **settings)).decodes_on_device

    beside = {"inference_sockets": str(tmp_path / "inference-0.sock")}
    assert not decodes_on_device() and not decodes_on_device(**beside)  # on a CPU: Pillow in the API processes
    monkeypatch.setattr(service.predictor, "serving_device", lambda setting: "cuda")
    assert decodes_on_device(**beside)  # the forward passes in an inference process on a GPU: nvjpeg there
    assert not decodes_on_device()  # on a GPU, but forward passes in each API process: Pillow in each
    assert not decodes_on_device(serving_decode="api", **beside)  # as set
    assert decodes_on_device(serving_decode="device")  # as set
