"""A disk that fills up while an upload arrives: 507 naming the problem, no row, no partial files,
and the server keeps serving; or while its ingest extracts it: the dataset fails with the same
error, and nothing of it is left. The data directory is a real, small tmpfs where the machine lets
tests mount one (root on these machines); elsewhere the same code path is driven by a write that
fails with ENOSPC after writing part of the file."""

import errno
import subprocess
from pathlib import Path

import pytest

from tests.archives import colour_dataset_zip, zip_tree
from tests.conftest import HYMENOPTERA
from tests.uploads import upload, upload_ready

TMPFS_BYTES = 2 * 1024**2


@pytest.fixture
def small_disk(tmp_path, monkeypatch, settings_env):
    """The data directory on a 2 MiB tmpfs (database and broker kept elsewhere); yields whether a
    real tmpfs was mounted."""
    monkeypatch.setenv("VISIONTUNE_DATABASE_URL", f"sqlite:///{tmp_path / 'db.sqlite'}")
    monkeypatch.setenv("VISIONTUNE_BROKER_URL", f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    settings_env.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(settings_env)],
                           capture_output=True)  # fmt: skip
    if mount.returncode != 0:
        from app.core import storage

        real_copy = storage._copy_hashing

        def copy_until_full(source, path: Path):
            with path.open("wb") as out:
                out.write(source.read(TMPFS_BYTES // 2))  # part of it lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(storage, "_copy_hashing", copy_until_full)
        yield False
        monkeypatch.setattr(storage, "_copy_hashing", real_copy)
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(settings_env)], check=False)


def test_an_upload_that_fills_the_disk_is_507_and_leaves_nothing(small_disk, client, tmp_path):
    archive = zip_tree(HYMENOPTERA, tmp_path / "big.zip", per_class={"train": 20, "val": 10})
    assert archive.stat().st_size > TMPFS_BYTES  # it cannot fit
    response = client.post("/v1/datasets", files={"file": ("big.zip", archive.read_bytes())})
    assert response.status_code == 507, response.text
    error = response.json()["error"]
    assert error["code"] == "insufficient_storage" and "no room" in error["message"]
    assert client.get("/v1/datasets").json()["data"] == []  # no row (refused before one was made)
    settings = client.app.state.serving.settings
    assert [p for p in settings.staging_dir.rglob("*") if p.is_file()] == []  # no partial file

    # The server keeps serving: a small upload fits and is accepted.
    if small_disk:
        assert upload_ready(client, colour_dataset_zip())["num_images"] == 10
    assert client.get("/healthz").status_code == 200


def test_a_disk_that_fills_during_the_ingest_fails_the_dataset_and_leaves_nothing(
    small_disk, client, tmp_path, monkeypatch
):
    """The archive fits; its extracted images do not (JPEGs barely compress, so they need about
    as much room again)."""
    archive = zip_tree(HYMENOPTERA, tmp_path / "fits.zip", per_class={"train": 4, "val": 2})
    assert TMPFS_BYTES / 2 < archive.stat().st_size < TMPFS_BYTES * 0.9
    if not small_disk:  # no tmpfs here: the extraction's writes fail with ENOSPC once past the same size
        from app.datasets import ingest

        real_read = ingest._read_chunks
        written = [0]

        def read_until_full(entry):
            for chunk in real_read(entry):
                written[0] += len(chunk)
                if written[0] + archive.stat().st_size > TMPFS_BYTES:
                    raise OSError(errno.ENOSPC, "No space left on device")
                yield chunk

        monkeypatch.setattr(ingest, "_read_chunks", read_until_full)
    dataset = upload(client, archive.read_bytes(), "fits.zip")
    assert dataset["status"] == "failed" and dataset["error"]["code"] == "insufficient_storage", dataset
    assert dataset["size_bytes"] == 0  # it holds none of the tenant's quota
    settings = client.app.state.serving.settings
    for directory in (settings.staging_dir, settings.uploads_dir, settings.datasets_dir):
        assert not directory.exists() or [p for p in directory.rglob("*") if p.is_file()] == [], directory
    assert client.get("/healthz").status_code == 200
