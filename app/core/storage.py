"""Receiving uploads: multipart bodies streamed to disk under a byte cap, never held in memory."""

import errno
import hashlib
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.core.errors import AppError, InsufficientStorage, Invalid, TooLarge, UnsupportedMedia

CHUNK = 1024 * 1024
# The route-level `max_body_size` of endpoints that stream their body under a cap of their own
# (from the settings, with a message naming it): it lifts the app's small default for them.
OWN_BODY_LIMIT = 2**63 - 1


@dataclass
class ReceivedFile:
    path: Path
    filename: str
    size: int
    sha256: str
    fields: dict[str, str]


async def capped_body(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The request body, refused with 413 as soon as it passes `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"The request body is {int(declared)} bytes; the limit is {max_bytes}.", code="body_too_large")
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise TooLarge(f"The request body exceeds the limit of {max_bytes} bytes.", code="body_too_large")
        yield chunk


async def parse_multipart(request: Request, max_bytes: int, max_files: int) -> FormData:
    """FastAPI's `UploadFile` parameters would parse the whole body before any limit applies, so
    bodies are parsed here with Starlette's own parser over a stream that stops at `max_bytes`."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedMedia("Expected a multipart/form-data body.", code="expected_multipart")
    try:
        return await MultiPartParser(request.headers, capped_body(request, max_bytes), max_files=max_files,
                                     max_fields=10).parse()  # fmt: skip
    except MultiPartException as exc:
        raise AppError(f"Malformed or oversized multipart body: {exc}", code="malformed_multipart") from exc


async def receive_file(request: Request, field: str, max_bytes: int, directory: Path) -> ReceivedFile:
    """Parse a multipart body holding one file in `field` and write that file to `directory`."""
    form = await parse_multipart(request, max_bytes, max_files=1)
    upload = form.get(field)
    try:
        if not isinstance(upload, UploadFile):
            raise Invalid(f"The form has no file field '{field}'.", code="missing_file")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"upload-{secrets.token_hex(8)}"
        with out_of_space_is_507(path):
            size, sha256 = await run_in_threadpool(_copy_hashing, upload.file, path)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return ReceivedFile(path, upload.filename or "upload", size, sha256, fields)
    finally:
        await form.close()


def _copy_hashing(source: BinaryIO, path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    source.seek(0)
    with path.open("wb") as out:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


@contextmanager
def out_of_space_is_507(*partial: Path) -> Iterator[None]:
    """A full disk (ENOSPC, or a quota: EDQUOT) while writing: remove what was partly written and
    answer 507, naming the problem, instead of a 500."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        for path in partial:
            remove_quietly(path)
        raise InsufficientStorage(
            "The server has no room left to store this upload; nothing of it was kept. Try again later.",
            code="insufficient_storage",
        ) from exc


def stale_entries(directory: Path, older_than: float) -> list[Path]:
    """Entries of `directory` not modified for `older_than` seconds (none if it does not exist)."""
    if not directory.is_dir():
        return []
    cutoff = time.time() - older_than
    return [entry for entry in directory.iterdir() if entry.lstat().st_mtime < cutoff]


def remove_unowned(session: Session, table: Any, directories: list[Path], older_than: float) -> list[str]:
    """Remove the entries of `directories`, untouched for `older_than` seconds, that are named
    after no row's id in `table` (files a stopped process left without a row); their names."""
    stale = [entry for directory in directories for entry in stale_entries(directory, older_than)]
    owned = set(session.scalars(select(table.id).where(table.id.in_([entry.name for entry in stale]))))
    orphans = [entry for entry in stale if entry.name not in owned]
    for entry in orphans:
        remove_quietly(entry)
    return [entry.name for entry in orphans]


def remove_quietly(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
