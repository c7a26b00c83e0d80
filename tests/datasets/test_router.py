"""POST /v1/datasets over HTTP: good uploads, and bad ones refused with a 4xx that names the
problem, leaving no dataset row and no files behind, with the server still serving.

Images are small synthetic ones made with Pillow: the point is the upload path, not the pictures.
"""

import io

import pytest
from PIL import Image

from tests.archives import solid_image as jpeg
from tests.archives import zip_bytes


def two_classes(n=5) -> dict[str, bytes]:
    return {f"cats/{i}.jpg": jpeg((200, 10, 10)) for i in range(n)} | {f"dogs/{i}.jpg": jpeg((10, 10, 200)) for i in range(n)}


def post(client, data: bytes, filename="data.zip", **form):
    return client.post("/v1/datasets", files={"file": (filename, data, "application/octet-stream")}, data=form)


def assert_nothing_stored(client, data_dir):
    assert client.get("/v1/datasets").json()["data"] == []
    for folder in ("datasets", "staging"):
        path = data_dir / folder
        assert not path.exists() or list(path.iterdir()) == [], f"left behind in {folder}: {list(path.iterdir())}"
    assert client.get("/healthz").status_code == 200


def test_upload_list_get_delete(client, settings_env):
    response = post(client, zip_bytes(two_classes() | {"dogs/notes.txt": b"not an image"}), name="pets")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["name"] == "pets" and dataset["status"] == "ready" and dataset["num_images"] == 10
    assert dataset["classes"] == [{"name": "cats", "train": 5, "val": 0}, {"name": "dogs", "train": 5, "val": 0}]
    assert any("notes.txt" in warning for warning in dataset["warnings"])
    assert len(dataset["sha256"]) == 64

    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [dataset["id"]]
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert_nothing_stored(client, settings_env)


BAD_UPLOADS = {
    "not_an_archive": (b"just some text, not an archive", 415),
    "unsafe_archive": (zip_bytes(two_classes() | {"../evil.jpg": jpeg()}), 422),
    "compression_bomb": (zip_bytes(two_classes() | {"cats/zeros.jpg": bytes(60 * 1024 * 1024)}), 422),
    "no_images": (zip_bytes({"cats/a.txt": b"x", "dogs/b.txt": b"y"}), 422),
    "single_class": (zip_bytes({f"cats/{i}.jpg": jpeg() for i in range(6)}), 422),
    "class_too_small": (zip_bytes(two_classes() | {"birds/0.jpg": jpeg()}), 422),
    "image_too_large": (zip_bytes(two_classes() | {"cats/huge.png": b""}), 422),  # filled in below
}


def _pixel_bomb_png() -> bytes:
    # A real PNG of 9000x9000 black pixels: it compresses to almost nothing but decodes to 81 Mpx.
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("code", sorted(BAD_UPLOADS))
def test_bad_upload_is_refused_and_nothing_is_stored(client, settings_env, code):
    data, status = BAD_UPLOADS[code]
    if code == "image_too_large":
        data = zip_bytes(two_classes() | {"cats/huge.png": _pixel_bomb_png()})
    response = post(client, data)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert_nothing_stored(client, settings_env)


def test_error_messages_name_the_problem(client, settings_env):
    assert "../evil.jpg" in post(client, BAD_UPLOADS["unsafe_archive"][0]).json()["error"]["message"]
    assert "birds" in post(client, BAD_UPLOADS["class_too_small"][0]).json()["error"]["message"]
    assert "huge.png" in post(client, zip_bytes(two_classes() | {"cats/huge.png": _pixel_bomb_png()})).json()["error"]["message"]


def test_truncated_image_is_skipped_with_a_warning(client, settings_env):
    good = two_classes()
    response = post(client, zip_bytes(good | {"cats/broken.jpg": jpeg()[:200]}))
    assert response.status_code == 201, response.text
    assert response.json()["num_images"] == len(good)
    assert any("broken.jpg" in warning for warning in response.json()["warnings"])


@pytest.fixture
def small_cap(settings_env, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_MAX_UPLOAD_BYTES", "4096")
    from app.core.config import get_settings

    get_settings.cache_clear()


def test_upload_over_the_size_cap_is_refused(small_cap, client, settings_env):
    response = post(client, zip_bytes(two_classes(20)))
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "body_too_large"
    assert_nothing_stored(client, settings_env)


def test_upload_over_the_cap_without_content_length_is_cut_off(small_cap, client, settings_env):
    body = zip_bytes(two_classes(20))
    boundary = "visiontune-test"
    payload = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.zip\"\r\n"
        "Content-Type: application/zip\r\n\r\n"
    ).encode() + body + f"\r\n--{boundary}--\r\n".encode()

    def chunks():  # a streamed body: no Content-Length, so the cap must hold while reading
        for start in range(0, len(payload), 1024):
            yield payload[start : start + 1024]

    response = client.post(
        "/v1/datasets", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 413, response.text
    assert_nothing_stored(client, settings_env)


def test_not_multipart_and_missing_file_field(client, settings_env):
    assert client.post("/v1/datasets", json={"file": "x"}).json()["error"]["code"] == "expected_multipart"
    response = client.post("/v1/datasets", data={"name": "x"}, files={"other": ("a.zip", b"123")})
    assert response.status_code == 422 and response.json()["error"]["code"] == "missing_file"
    assert_nothing_stored(client, settings_env)


def test_unknown_dataset_is_404_with_the_envelope(client):
    response = client.get(f"/v1/datasets/ds_{'0' * 24}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "dataset_not_found"
