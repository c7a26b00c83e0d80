"""Durable bytes: one small interface over an object store (`STORAGE_URL`).

Keys are the paths of the files below the data directory (`models/<id>/model.safetensors`,
`jobs/<id>/checkpoint.pt`, `exports/<id>/model.onnx`, `uploads/<dataset id>`), so every process's
data directory is a local copy of part of the store. A dataset's images are one object,
`datasets/<sha256>` (a tar of the directory of that name; see `put_packed`):
- `file://DIR` (the default: the data directory itself). With the default, the local copy *is*
  the store, and `put`/`get` have nothing to copy. Another directory (a shared mount) gets copies.
- `s3://bucket/prefix`: any S3-compatible store through boto3, configured only by the standard
  AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
  `AWS_DEFAULT_REGION`). The data directory is then a cache: what a process needs is fetched on
  first use, and caches are bounded (app/core/caches.py).

boto3 rather than fsspec/s3fs or obstore: it is the reference client every S3-compatible server is
tested against, its transfer manager does multipart uploads and parallel parts by itself, and it
reads the standard AWS variables with no glue.

Writes are atomic for readers: an S3 object appears whole when its PUT (or multipart upload)
completes, and a file is written to a temporary name and renamed. Rows in the database point at
objects only after the objects are complete.
"""

import errno
import os
import secrets
import shutil
import tarfile
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from app.core.config import Settings, get_settings
from app.core.errors import AppError

TRANSFER_THREADS = 8  # objects fetched or sent at once for a directory


class StorageUnavailable(AppError):
    status_code = 503
    code = "storage_unavailable"


class StorageFull(AppError):
    status_code = 507
    code = "storage_full"


class ObjectStore(ABC):
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir

    @property
    def is_local(self) -> bool:
        """True when the data directory is the store itself: nothing is a cache, nothing evicted."""
        return False

    @abstractmethod
    def put(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def get(self, key: str, path: Path) -> None:
        """Fetch an object to `path` (written under a temporary name, then renamed)."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A stream of the object's bytes (to be closed by the caller)."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """The keys below `prefix/`."""

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """The object `prefix` and every object below `prefix/`."""

    @abstractmethod
    def check(self) -> None:
        """Raise if the store cannot be reached (for /readyz)."""

    def local(self, key: str) -> Path:
        return self.data_dir / key

    def put_tree(self, prefix: str) -> None:
        """Send every file of the local directory `prefix` (below the data directory)."""
        root = self.local(prefix)
        files = [p for p in root.rglob("*") if p.is_file()]
        self._each(lambda p: self.put(f"{prefix}/{p.relative_to(root).as_posix()}", p), files)

    def get_tree(self, prefix: str, into: Path | None = None) -> bool:
        """Fetch every object below `prefix` into `into` (default: its local place); False if
        there is none."""
        keys = self.keys(prefix)
        target = into or self.local(prefix)
        self._each(lambda key: self.get(key, target / key[len(prefix) + 1 :]), keys)
        return bool(keys)

    def put_packed(self, prefix: str) -> None:
        """Send the local directory `prefix` as one object: an uncompressed tar (images are
        compressed already). A dataset is thousands of small files, and a request per file costs
        more than its bytes: hymenoptera's 396 images took 1.65 s to moto's server one by one,
        0.33 s as one tar."""
        if self.is_local:
            return
        staging = self.data_dir / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=staging, prefix="pack-", suffix=".tar") as packed:
            with tarfile.open(fileobj=packed, mode="w") as archive:
                archive.add(self.local(prefix), arcname=".")
            packed.flush()
            self.put(prefix, Path(packed.name))

    def get_packed(self, key: str, into: Path) -> bool:
        """Unpack the object `key` written by `put_packed` into `into` as it streams in; False if
        there is no such object."""
        try:
            stream = self.open(key)
        except FileNotFoundError:
            return False
        with stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            archive.extractall(into, filter="data")  # refuses links and paths out of `into`
        return True

    @staticmethod
    def _each(action, items) -> None:
        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            for _ in pool.map(action, items):
                pass


class FileStore(ObjectStore):
    def __init__(self, data_dir: Path, root: Path):
        super().__init__(data_dir)
        self.root = root

    @property
    def is_local(self) -> bool:
        return self.root.resolve() == self.data_dir.resolve()

    def put(self, key: str, path: Path) -> None:
        _copy(path, self.root / key)

    def get(self, key: str, path: Path) -> None:
        source = self.root / key
        if not source.is_file():
            raise FileNotFoundError(f"no object {key!r} in {self.root}")
        _copy(source, path)

    def open(self, key: str) -> BinaryIO:
        return (self.root / key).open("rb")

    def keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return sorted(f"{prefix}/{p.relative_to(base).as_posix()}" for p in base.rglob("*") if p.is_file())

    def delete(self, prefix: str) -> None:
        path = self.root / prefix
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StorageUnavailable(f"The storage directory {self.root} is not writable.")


class S3Store(ObjectStore):
    def __init__(self, data_dir: Path, bucket: str, prefix: str):
        import boto3  # only where s3:// is configured
        from botocore.config import Config

        super().__init__(data_dir)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        # Endpoint, credentials and region come from the standard AWS variables; a short
        # connect timeout and few retries so that a store that is down is reported, not waited on.
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                        max_pool_connections=TRANSFER_THREADS * 2)  # fmt: skip
        self.client = boto3.client("s3", config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """boto3's failures as ours: a missing object is FileNotFoundError; anything else (store
        down, credentials refused) is a 503 naming the store."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"no object {key!r} in bucket {self.bucket!r}") from exc
            raise StorageUnavailable(f"The object store (bucket {self.bucket!r}) refused {key!r}: {exc}") from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise StorageUnavailable(f"The object store (bucket {self.bucket!r}) cannot be reached: {exc}") from exc

    def put(self, key: str, path: Path) -> None:
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key))

    def get(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(handle)
        try:
            with self._errors(key):
                self.client.download_file(self.bucket, self._key(key), temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def open(self, key: str) -> BinaryIO:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

    def get_packed(self, key: str, into: Path) -> bool:
        with self._errors(key):  # the connection may also fail while the body streams in
            return super().get_packed(key, into)

    def keys(self, prefix: str) -> list[str]:
        found, strip = [], len(self._key(""))
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix) + "/")
            for page in pages:
                found += [item["Key"][strip:] for item in page.get("Contents", [])]
        return sorted(found)

    def delete(self, prefix: str) -> None:
        keys = [prefix, *self.keys(prefix)]
        with self._errors(prefix):
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def check(self) -> None:
        with self._errors(""):
            self.client.head_bucket(Bucket=self.bucket)


def local_copy(key: str, budget: int, packed: bool = False) -> Path:
    """The local directory of the objects below `key` (or of the one object `key` when `packed`,
    see `put_packed`): with a remote store, fetched on first use
    (into staging, then renamed into place, so that a half-fetched copy is never used), and the
    local copies beside it evicted, least recently used first, beyond `budget` bytes. With the
    default store the directory is the store itself, and is returned as it is."""
    store = get_store()
    path = store.local(key)
    if store.is_local:
        return path
    if path.is_dir():
        os.utime(path)  # used now: the last to be evicted
        return path
    staging = store.data_dir / "staging" / f"fetch-{secrets.token_hex(6)}"
    fetch = store.get_packed if packed else store.get_tree
    try:
        try:
            found = fetch(key, staging)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The local disk is full: make room by evicting every other local copy, then try once more.
            shutil.rmtree(staging, ignore_errors=True)
            if path.parent.is_dir():
                evict(path.parent, 0, keep=path)
            try:
                found = fetch(key, staging)
            except OSError as again:
                if again.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise StorageFull(f"This machine's disk has no room for {key!r}, even with its cache emptied "
                                  f"({store.data_dir}).") from again  # fmt: skip
        if not found:
            raise FileNotFoundError(f"the object store has nothing under {key!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, path)
        except OSError:  # another process of this machine fetched it first
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    evict(path.parent, budget, keep=path)
    return path


def evict(directory: Path, budget: int, keep: Path) -> list[str]:
    """Remove the least recently used entries of a cache directory until it holds at most
    `budget` bytes (never `keep`, the one about to be used); the names removed."""
    entries = sorted((p for p in directory.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in entries}
    total, removed = sum(sizes.values()), []
    for entry in entries:
        if total <= budget:
            break
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            total -= sizes[entry]
            removed.append(entry.name)
    return removed


def _copy(source: Path, destination: Path) -> None:
    """Copy under a temporary name, then rename: a reader sees the old file or the whole new one."""
    if source.resolve() == destination.resolve():
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def make_store(settings: Settings) -> ObjectStore:
    url = urlparse(settings.storage_url or settings.data_dir.as_uri())
    if url.scheme == "file":
        return FileStore(settings.data_dir, Path(unquote(url.path)))
    if url.scheme == "s3":
        return S3Store(settings.data_dir, url.netloc, url.path)
    raise ValueError(f"STORAGE_URL must be file:// or s3://, not {settings.storage_url!r}")


@lru_cache
def get_store() -> ObjectStore:
    return make_store(get_settings())
