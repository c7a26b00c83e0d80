"""POST /v1/datasets over HTTP: the archive is accepted (202 `processing`) and a worker ingests it
(here the worker's own code, run in this process). Good uploads become `ready`; bad ones are
refused with a 4xx at once when the request itself is wrong (not an archive, too large, not
multipart), or `failed` with an error that names the problem when their content is; either way no
files are left behind, and the server keeps serving.

Images are small synthetic ones made with Pillow: the point is the upload path, not the pictures.
"""

import io

import pytest
from PIL import Image

from tests.archives import solid_image as jpeg
from tests.archives import zip_bytes
from tests.uploads import ingest


def two_classes(n=5) -> dict[str, bytes]:
    return {f"cats/{i}.jpg": jpeg((200, 10, 10)) for i in range(n)} | {f"dogs/{i}.jpg": jpeg((10, 10, 200)) for i in range(n)}


def post(client, data: bytes, filename="data.zip", **form):
    return client.post("/v1/datasets", files={"file": (filename, data, "application/octet-stream")}, data=form)


def assert_nothing_stored(client, data_dir, rows: int = 0):
    assert len(client.get("/v1/datasets").json()["data"]) == rows
    for folder in ("datasets", "staging", "uploads"):
        path = data_dir / folder
        assert not path.exists() or list(path.iterdir()) == [], f"left behind in {folder}: {list(path.iterdir())}"
    assert client.get("/healthz").status_code == 200


def test_upload_list_get_delete(client, settings_env):
    archive = zip_bytes(two_classes() | {"dogs/notes.txt": b"not an image"})
    response = post(client, archive, name="pets")
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/datasets/{response.json()['id']}"
    accepted = response.json()
    assert accepted["status"] == "processing" and accepted["archive_bytes"] == accepted["size_bytes"] == len(archive)
    dataset = ingest(client, response)
    assert dataset["name"] == "pets" and dataset["status"] == "ready" and dataset["num_images"] == 10
    assert dataset["error"] is None and dataset["finished_at"]
    # The quota now counts the images kept, not the archive.
    (stored,) = (settings_env / "datasets").iterdir()  # named after the content: datasets/<sha256>
    assert len(stored.name) == 64
    images = sum(p.stat().st_size for p in stored.rglob("*") if p.is_file())
    assert dataset["size_bytes"] == images and dataset["archive_bytes"] == len(archive)
    assert not (settings_env / "uploads" / dataset["id"]).exists()  # the archive is gone once ingested
    assert dataset["classes"] == [{"name": "cats", "train": 5, "val": 0}, {"name": "dogs", "train": 5, "val": 0}]
    assert any("notes.txt" in warning for warning in dataset["warnings"])
    assert len(dataset["sha256"]) == 64

    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [dataset["id"]]
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert_nothing_stored(client, settings_env)


def test_identical_uploads_share_their_images_until_the_last_is_deleted(client, settings_env):
    archive = zip_bytes(two_classes())
    first, second = (ingest(client, post(client, archive)) for _ in range(2))
    assert first["status"] == second["status"] == "ready" and first["id"] != second["id"]
    (stored,) = (settings_env / "datasets").iterdir()  # one copy, named after its content
    assert client.delete(f"/v1/datasets/{first['id']}").status_code == 204
    assert stored.is_dir()  # still the second one's
    assert client.delete(f"/v1/datasets/{second['id']}").status_code == 204
    assert_nothing_stored(client, settings_env)


BAD_UPLOADS = {  # each is accepted, then its ingest fails with this error code
    "unsafe_archive": zip_bytes(two_classes() | {"../evil.jpg": jpeg()}),
    "compression_bomb": zip_bytes(two_classes() | {"cats/zeros.jpg": bytes(60 * 1024 * 1024)}),
    "no_images": zip_bytes({"cats/a.txt": b"x", "dogs/b.txt": b"y"}),
    "single_class": zip_bytes({f"cats/{i}.jpg": jpeg() for i in range(6)}),
    "class_too_small": zip_bytes(two_classes() | {"birds/0.jpg": jpeg()}),
    "image_too_large": b"",  # filled in below
}


def _pixel_bomb_png() -> bytes:
    # A real PNG of 9000x9000 black pixels: it compresses to almost nothing but decodes to 81 Mpx.
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, "PNG")
    return buffer.getvalue()


def test_what_is_not_an_archive_is_refused_at_once(client, settings_env):
    response = post(client, b"just some text, not an archive")
    assert response.status_code == 415 and response.json()["error"]["code"] == "not_an_archive"
    assert_nothing_stored(client, settings_env)


@pytest.mark.parametrize("code", sorted(BAD_UPLOADS))
def test_bad_upload_fails_naming_the_problem_and_nothing_is_stored(client, settings_env, code):
    data = BAD_UPLOADS[code]
    if code == "image_too_large":
        data = zip_bytes(two_classes() | {"cats/huge.png": _pixel_bomb_png()})
    dataset = ingest(client, post(client, data))
    assert dataset["status"] == "failed" and dataset["size_bytes"] == 0, dataset
    assert dataset["error"]["code"] == code and dataset["error"]["message"]
    assert_nothing_stored(client, settings_env, rows=1)  # the failed row says why; no files
    jobs = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100"})
    assert jobs.status_code == 409 and jobs.json()["error"]["code"] == "dataset_not_ready"
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert_nothing_stored(client, settings_env)


def test_error_messages_name_the_problem(client, settings_env):
    def error(data: bytes) -> str:
        return ingest(client, post(client, data))["error"]["message"]

    assert "../evil.jpg" in error(BAD_UPLOADS["unsafe_archive"])
    assert "birds" in error(BAD_UPLOADS["class_too_small"])
    assert "huge.png" in error(zip_bytes(two_classes() | {"cats/huge.png": _pixel_bomb_png()}))


def test_a_dataset_still_processing_takes_no_job_and_can_be_deleted(client, settings_env):
    accepted = post(client, zip_bytes(two_classes())).json()
    jobs = client.post("/v1/jobs", json={"dataset_id": accepted["id"], "backbone": "mobilenetv2_100"})
    assert jobs.status_code == 409 and jobs.json()["error"]["code"] == "dataset_not_ready"
    assert client.delete(f"/v1/datasets/{accepted['id']}").status_code == 204
    from app.datasets.runner import run_ingest

    assert run_ingest(accepted["id"]) == "not_held"  # its message, arriving late, does nothing
    assert_nothing_stored(client, settings_env)


def test_truncated_image_is_skipped_with_a_warning(client, settings_env):
    good = two_classes()
    dataset = ingest(client, post(client, zip_bytes(good | {"cats/broken.jpg": jpeg()[:200]})))
    assert dataset["status"] == "ready" and dataset["num_images"] == len(good)
    assert any("broken.jpg" in warning for warning in dataset["warnings"])


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


def test_lists_page_newest_first_with_after(client, settings_env):
    """Five uploads (synthetic images: the point is the listing), paged two at a time with `after`;
    an upload between two pages shifts nothing; a cursor that is not the tenant's is refused."""
    ids = [post(client, zip_bytes(two_classes()), filename=f"d{i}.zip").json()["id"] for i in range(5)]
    newest_first = list(reversed(ids))
    first = client.get("/v1/datasets", params={"limit": 2}).json()["data"]
    assert [d["id"] for d in first] == newest_first[:2]
    post(client, zip_bytes(two_classes()), filename="later.zip")  # added while paging: not in the later pages
    pages, after = [first], first[-1]["id"]
    while page := client.get("/v1/datasets", params={"limit": 2, "after": after}).json()["data"]:
        pages.append(page)
        after = page[-1]["id"]
    assert [[d["id"] for d in page] for page in pages] == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    refused = client.get("/v1/datasets", params={"after": "ds_" + "0" * 24})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_cursor"
    assert "ds_000000000000000000000000" in refused.json()["error"]["message"]
