"""GET /v1/datasets/{id}/images and /images/{path}: a ready dataset's images listed by path (by class,
page by page) and served as JPEG thumbnails; nothing but the dataset's own images is ever served.

The dataset is a few real hymenoptera photos (with its own val/ split), uploaded and ingested in
this process; orientation is checked on a synthetic photo with an EXIF rotation."""

import io

import pytest
from PIL import Image

from tests.archives import zip_bytes, zip_tree
from tests.conftest import HYMENOPTERA
from tests.tenants.test_tenancy import new_tenant
from tests.uploads import upload_ready


@pytest.fixture
def dataset(client, tmp_path) -> dict:
    archive = zip_tree(HYMENOPTERA, tmp_path / "small.zip", per_class={"train": 6, "val": 5})
    return upload_ready(client, archive.read_bytes(), "small.zip")


def images(client, dataset_id: str, **params):
    return client.get(f"/v1/datasets/{dataset_id}/images", params=params)


def expected_paths(split: str, label: str, n: int) -> list[str]:
    """The first n files of HYMENOPTERA/<split>/<label>, as zip_tree keeps them, named like the API."""
    return [f"{split}/{label}/{f.name}" for f in sorted((HYMENOPTERA / split / label).iterdir())[:n]]


def test_lists_every_kept_image_sorted_by_path_by_class_and_page_by_page(client, dataset):
    url = f"/v1/datasets/{dataset['id']}/images"
    everything = images(client, dataset["id"], limit=200).json()["data"]
    paths = [image["path"] for image in everything]
    assert paths == sorted(paths) and len(paths) == dataset["num_images"] == 22
    assert set(paths) == {*expected_paths("train", "ants", 6), *expected_paths("train", "bees", 6),
                          *expected_paths("val", "ants", 5), *expected_paths("val", "bees", 5)}  # fmt: skip
    for image in everything:
        split, label, _ = image["path"].split("/")
        assert image == {"path": image["path"], "label": label, "split": split}
    assert images(client, dataset["id"]).json()["data"] == everything[:20]  # limit defaults to 20

    bees = images(client, dataset["id"], label="bees", limit=200).json()["data"]
    assert bees == [image for image in everything if image["label"] == "bees"] and len(bees) == 11

    # Keyset pages: each starts after the last path of the one before, and together they are the list.
    for label, expected in ((None, everything), ("ants", [i for i in everything if i["label"] == "ants"])):
        pages, after = [], None
        while page := images(client, dataset["id"], limit=4, **({"label": label} if label else {}),
                             **({"after": after} if after else {})).json()["data"]:  # fmt: skip
            assert len(page) <= 4
            pages.append(page)
            after = page[-1]["path"]
        assert [image for page in pages for image in page] == expected
    # A cursor is a position in path order, not an id: any string works.
    assert images(client, dataset["id"], after="train/bees").json()["data"][0]["path"].startswith("train/bees/")
    assert images(client, dataset["id"], after="zzz").json()["data"] == []

    unknown = images(client, dataset["id"], label="wasps")
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_label"
    assert "'wasps'" in unknown.json()["error"]["message"]
    for bad in ({"limit": 0}, {"limit": 201}, {"limit": "x"}, {"label": "x" * 201}):
        response = client.get(url, params=bad)
        assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error", bad


def test_thumbnails_are_jpegs_no_larger_than_asked_and_cacheable(client, dataset):
    path = expected_paths("val", "bees", 1)[0]
    with Image.open(HYMENOPTERA / path) as original:
        width, height = original.size
    for size in (None, 16, 64, 512):
        response = client.get(f"/v1/datasets/{dataset['id']}/images/{path}", params={"size": size} if size else {})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/jpeg"
        assert response.headers["cache-control"] == "private, max-age=3600"
        with Image.open(io.BytesIO(response.content)) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.mode == "RGB"
            thumbnail.load()  # the whole image decodes
            longest = size or 160
            assert max(thumbnail.size) == min(longest, max(width, height))
            assert abs(thumbnail.width / thumbnail.height - width / height) < 0.05  # the shape is kept
    for size in (15, 513, "big"):
        response = client.get(f"/v1/datasets/{dataset['id']}/images/{path}", params={"size": size})
        assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error"


def test_a_thumbnail_is_the_right_way_up(client):
    """A camera's portrait photo: stored landscape (200x100) with EXIF orientation 6 (rotate 90°)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (200, 100), (200, 10, 10)).save(buffer, "JPEG", exif=exif)
    files = {f"{label}/{i}.jpg": buffer.getvalue() for label in ("cats", "dogs") for i in range(5)}
    dataset = upload_ready(client, zip_bytes(files))
    listed = images(client, dataset["id"]).json()["data"]
    # A dataset uploaded without a val/ split keeps all of its images in train/.
    assert [i["path"] for i in listed] == sorted(f"train/{name}" for name in files)
    assert {i["split"] for i in listed} == {"train"}
    thumbnail = client.get(f"/v1/datasets/{dataset['id']}/images/train/cats/0.jpg", params={"size": 64})
    assert Image.open(io.BytesIO(thumbnail.content)).size == (32, 64)


def test_only_the_datasets_own_images_are_served(client, dataset, settings_env):
    base = f"/v1/datasets/{dataset['id']}/images"
    listed = expected_paths("train", "ants", 1)[0]
    assert client.get(f"{base}/{listed}").status_code == 200
    (stored,) = (settings_env / "datasets").iterdir()
    assert (stored / listed).is_file()
    refused = [
        "",
        "train",
        "train/ants",
        "train/ants/",
        "train/ants/missing.jpg",
        f"{listed}/",
        f"%2E/{listed}",
        f"train/ants/%2E%2E/ants/{listed.rsplit('/', 1)[1]}",  # the same file, but not its path as listed
        f"%2E%2E/{stored.name}/{listed}",  # its own file, reached from outside: still not a listed path
        "%2E%2E/%2E%2E/visiontune.db",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "%2E%2E",
        "train/ants/%00.jpg",
        "TRAIN/ants/" + listed.rsplit("/", 1)[1],
    ]
    for path in refused:
        response = client.get(f"{base}/{path}")
        assert response.status_code == 404, (path, response.status_code, response.text)
        assert response.json()["error"]["code"] == "image_not_found", path
        assert "root:" not in response.text


def test_another_tenants_dataset_is_404_and_a_processing_one_409(client, dataset):
    _, other = new_tenant(client, "other", scopes=("read", "train"))
    listed = expected_paths("val", "ants", 1)[0]
    for url in (f"/v1/datasets/{dataset['id']}/images", f"/v1/datasets/{dataset['id']}/images/{listed}"):
        response = client.get(url, headers=other)
        assert response.status_code == 404 and response.json()["error"]["code"] == "dataset_not_found"
    assert (
        client.get(f"/v1/datasets/{dataset['id']}/images", headers={"Authorization": "Bearer nope"}).status_code == 401
    )

    # Accepted but not yet ingested (no worker has run): not ready, whatever the path.
    files = {"file": ("later.zip", zip_bytes({f"{c}/{i}.jpg": b"x" for c in ("a", "b") for i in range(5)}))}
    processing = client.post("/v1/datasets", files=files).json()
    assert processing["status"] == "processing"
    for url in (f"/v1/datasets/{processing['id']}/images", f"/v1/datasets/{processing['id']}/images/train/a/0.jpg"):
        response = client.get(url)
        assert response.status_code == 409 and response.json()["error"]["code"] == "dataset_not_ready"
        assert "processing" in response.json()["error"]["message"]
