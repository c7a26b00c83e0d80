"""An uploaded archive becomes a validated ImageFolder: train/<class>/... and optionally val/<class>/...

Every entry is listed and checked before a single byte is written, so a hostile archive (path
traversal, links, special files, bombs) is refused as a whole. Then each kept file is streamed to
its place and decoded once with Pillow; files that are not images are dropped with a warning.
"""

import os
import shutil
import stat
import tarfile
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from PIL import Image

from app.core.errors import Invalid, TooLarge, UnsupportedMedia
from app.ml.image_formats import IMAGE_FORMATS

SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": None}
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
MAX_CLASS_NAME = 100
MAX_DEPTH = 16  # folders in an entry's path; ImageFolder needs 3 (split/class/image) below a wrapper
MAX_PATH_BYTES = 1024
CHUNK = 1 << 20


@dataclass(frozen=True)
class IngestLimits:
    max_uncompressed_bytes: int
    max_archive_entries: int
    max_compression_ratio: float
    max_image_pixels: int
    min_images_per_class: int


@dataclass
class IngestResult:
    classes: list[dict]  # [{"name", "train", "val"}] sorted by name: this order is the label order
    num_images: int
    has_val_split: bool
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    """One zip or tar member, reduced to what ingestion needs."""

    name: str  # as stored in the archive, for messages
    size: int  # declared uncompressed size
    is_dir: bool
    refusal: str | None  # why this kind of member is refused (link, device...), None if acceptable
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True)
class _File:
    entry: _Entry
    parts: tuple[str, ...]  # normalised path inside the archive


def check_format(archive: Path) -> None:
    """Refuse at once what is not a zip or tar archive at all (reads only its first bytes)."""
    with _open_archive(archive):
        pass


def ingest_archive(
    archive: Path, destination: Path, limits: IngestLimits, before_extract: Callable[[int], None] = lambda _: None
) -> IngestResult:
    """Unpack `archive` into the new directory `destination`; on any error nothing is left behind.
    `before_extract` is told the declared uncompressed size of what will be written, once every
    entry has been checked and before a byte is written (a storage quota may refuse it there)."""
    destination.mkdir(parents=True)  # must not exist: everything inside is ours to remove on failure
    try:
        return _ingest(archive, destination, limits, before_extract)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise


def _ingest(archive: Path, destination: Path, limits: IngestLimits, before_extract: Callable[[int], None]) -> IngestResult:
    warnings: list[str] = []
    with _open_archive(archive) as members:
        entries = _list_within_limits(members, archive.stat().st_size, limits)
        files = _safe_files(entries)
        files = _drop_system_files(files, warnings)
        plan = _plan_layout(files, warnings)
        before_extract(sum(placement.entry.size for placement in plan))
        _write(plan, destination, limits.max_uncompressed_bytes)
    rejected = _decode_all(plan, destination, limits.max_image_pixels)
    for name, reason in rejected.items():
        warnings.append(f"Skipped {name!r}: {reason}")
    counts = _count_images(plan, rejected, destination)
    classes = _check_classes(counts, rejected, limits.min_images_per_class, warnings)
    return IngestResult(
        classes=classes,
        num_images=sum(c["train"] + c["val"] for c in classes),
        has_val_split=any(c["val"] for c in classes),
        warnings=warnings,
    )


# -- reading the archive ------------------------------------------------------------------------


@contextmanager
def _open_archive(archive: Path) -> Iterator[Iterator[_Entry]]:
    """Yield the archive's members lazily; the format is told from the content, never the name."""
    if zipfile.is_zipfile(archive):
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise Invalid(f"The zip archive is corrupt: {exc}.", code="corrupt_archive") from exc
        with zf:
            yield (_zip_entry(zf, info) for info in zf.infolist())
        return
    try:
        tf = tarfile.open(archive)  # "r:*": plain, gzip, bz2 or xz
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UnsupportedMedia(
            "The upload is not a zip or tar archive (.zip, .tar, .tar.gz).", code="not_an_archive"
        ) from exc
    with tf:
        yield (_tar_entry(tf, member) for member in _read_tar_headers(tf))


def _read_tar_headers(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    try:
        yield from tf
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise Invalid(f"The tar archive is corrupt or truncated: {exc}.", code="corrupt_archive") from exc


def _zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Entry:
    name = info.orig_filename  # ZipInfo.filename silently cuts names at a NUL byte
    if info.flag_bits & 0x1:
        raise UnsupportedMedia(f"Archive entry {name!r} is encrypted.", code="encrypted_archive")
    mode = info.external_attr >> 16
    file_type = stat.S_IFMT(mode)  # 0 when the zip was not made on Unix
    refusal = None
    if stat.S_ISLNK(mode):
        refusal = "is a symbolic link"
    elif file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        refusal = "is not a regular file"
    is_dir = info.is_dir() or name.endswith("\\") or file_type == stat.S_IFDIR
    return _Entry(name, info.file_size, is_dir, refusal, lambda: zf.open(info))


def _tar_entry(tf: tarfile.TarFile, member: tarfile.TarInfo) -> _Entry:
    refusal = None
    if member.issym():
        refusal = "is a symbolic link"
    elif member.islnk():
        refusal = "is a hard link"
    elif not (member.isreg() or member.isdir()):
        refusal = "is a device, FIFO or other special file"
    size = member.size if member.isreg() else 0
    return _Entry(member.name, size, member.isdir(), refusal, lambda: tf.extractfile(member))


def _list_within_limits(members: Iterable[_Entry], archive_size: int, limits: IngestLimits) -> list[_Entry]:
    """Collect the entries, stopping as soon as a bomb limit is crossed (before reading further)."""
    entries, declared = [], 0
    for entry in members:
        entries.append(entry)
        declared += entry.size
        if len(entries) > limits.max_archive_entries:
            raise TooLarge(
                f"The archive has more than {limits.max_archive_entries} entries.", code="too_many_entries"
            )
        if declared > limits.max_uncompressed_bytes:
            raise TooLarge(
                f"The archive unpacks to more than {limits.max_uncompressed_bytes} bytes.", code="archive_too_large"
            )
        if declared / max(archive_size, 1) > limits.max_compression_ratio:
            raise Invalid(
                f"The archive expands more than {limits.max_compression_ratio:g} times its size "
                f"(at {entry.name!r}); refusing it as a compression bomb.",
                code="compression_bomb",
            )
    return entries


# -- validating names ---------------------------------------------------------------------------


def _unsafe(entry_name: str, why: str) -> Invalid:
    return Invalid(f"Archive entry {entry_name!r} {why}; the archive was refused.", code="unsafe_archive")


def _has_control_chars(text: str) -> bool:
    # Cs: undecodable bytes that tarfile smuggles in as surrogates; Cf: invisible format characters
    # (right-to-left override, zero-width joiners, BOM) that make one name look like another.
    return any(unicodedata.category(ch) in ("Cc", "Cs", "Cf") for ch in text)


def _normalise(entry: _Entry) -> tuple[str, ...]:
    name = entry.name
    if _has_control_chars(name):
        raise _unsafe(name, "contains control characters or undecodable bytes")
    if name.startswith(("/", "\\")) or (len(name) >= 2 and name[1] == ":" and name[0].isalpha()):
        raise _unsafe(name, "is an absolute path")
    parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
    if ".." in parts:
        raise _unsafe(name, "points outside the archive ('..')")
    if any(len(p.encode()) > 255 for p in parts):
        raise _unsafe(name, "has a path component longer than 255 bytes")
    if len(parts) > MAX_DEPTH or len(name.encode()) > MAX_PATH_BYTES:
        raise _unsafe(name, f"is nested deeper than {MAX_DEPTH} folders or longer than {MAX_PATH_BYTES} bytes")
    return parts


def _safe_files(entries: list[_Entry]) -> list[_File]:
    """Refuse the archive if any entry is unsafe; return the regular files."""
    files = []
    for entry in entries:
        parts = _normalise(entry)
        if entry.refusal:
            raise _unsafe(entry.name, entry.refusal)
        if not entry.is_dir and parts:
            files.append(_File(entry, parts))
    _check_unique((f.parts, f.entry.name) for f in files)
    return files


def _check_unique(paths: Iterable[tuple[tuple[str, ...], str]]) -> None:
    """Two entries must never write the same path, nor a file sit where another needs a directory."""
    seen: dict[tuple[str, ...], str] = {}
    for original, name in paths:
        # Compared as a case-insensitive or normalising file system (macOS, Windows, some mounts)
        # would store them: 'Ants/x.jpg' and 'ants/X.jpg', or an 'é' composed and decomposed,
        # would overwrite each other there.
        parts = tuple(unicodedata.normalize("NFC", part).casefold() for part in original)
        if parts in seen:
            raise _unsafe(name, f"has the same path as {seen[parts]!r}")
        seen[parts] = name
    for parts, name in seen.items():
        for depth in range(1, len(parts)):
            if parts[:depth] in seen:
                raise _unsafe(name, f"is inside {seen[parts[:depth]]!r}, which is a file")


def _drop_system_files(files: list[_File], warnings: list[str]) -> list[_File]:
    def is_system(parts: tuple[str, ...]) -> bool:
        return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1].lower() in SYSTEM_FILES

    dropped = [f.entry.name for f in files if is_system(f.parts)]
    if dropped:
        warnings.append(f"Skipped {len(dropped)} hidden or system file(s) (e.g. {_some(dropped)}).")
    return [f for f in files if not is_system(f.parts)]


def _some(names: list[str], shown: int = 5) -> str:
    text = ", ".join(repr(n) for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


# -- layout -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    entry: _Entry
    target: tuple[str, ...]  # (split, class, *sub-path) below the destination


def _plan_layout(files: list[_File], warnings: list[str]) -> list[_Placement]:
    paths = [f.parts for f in files]
    # A wrapper folder ("hymenoptera/train/ants/x.jpg") is not a class: strip what all files share.
    depth = 0
    while paths and all(len(p) - depth >= 3 for p in paths) and len({p[depth] for p in paths}) == 1:
        depth += 1
    paths = [p[depth:] for p in paths]

    top_dirs = {p[0] for p in paths if len(p) >= 2}
    split_layout = "train" in top_dirs and top_dirs <= SPLIT_DIRS.keys()
    placements, stray, test = [], [], []
    for file, parts in zip(files, paths):
        if split_layout and parts[0] == "test" and len(parts) >= 2:
            test.append(file.entry.name)
            continue
        if not split_layout:
            target = ("train", *parts)
        else:  # every top folder is a split name here; a lone top-level file stays too short
            target = (SPLIT_DIRS[parts[0]], *parts[1:]) if len(parts) > 1 else parts
        if len(target) < 3:
            stray.append(file.entry.name)
            continue
        _check_class_name(target[1])
        placements.append(_Placement(file.entry, target))

    if stray:
        warnings.append(f"Skipped {len(stray)} file(s) outside any class folder: {_some(stray)}.")
    if test:
        warnings.append(f"Ignored the test/ split ({len(test)} file(s)); only train and val are used.")
    # "val/" and "validation/" both map to val/: they must not collide there.
    _check_unique((p.target, p.entry.name) for p in placements)
    return placements


def _check_class_name(name: str) -> None:
    if _has_control_chars(name) or len(name) > MAX_CLASS_NAME:
        raise Invalid(
            f"Class folder name {name[:MAX_CLASS_NAME]!r} is not usable: at most {MAX_CLASS_NAME} "
            "characters and no control characters.",
            code="invalid_class_name",
        )


# -- writing and decoding -----------------------------------------------------------------------


def _write(plan: list[_Placement], destination: Path, budget: int) -> None:
    written = 0
    for placement in plan:  # archive order, so a compressed tar is read forward only
        path = destination.joinpath(*placement.target)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("xb") as out:
            for chunk in _read_chunks(placement.entry):
                written += len(chunk)
                # Declared sizes are only claims; the bytes actually produced are what count.
                if written > budget:
                    raise TooLarge(f"The archive unpacks to more than {budget} bytes.", code="archive_too_large")
                out.write(chunk)


def _read_chunks(entry: _Entry) -> Iterator[bytes]:
    try:
        with entry.open() as source:
            while chunk := source.read(CHUNK):
                yield chunk
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, NotImplementedError) as exc:
        # NotImplementedError: a zip compression method Python lacks (Deflate64...)
        raise Invalid(f"Archive entry {entry.name!r} could not be read: {exc}.", code="corrupt_archive") from exc


def _decode_all(plan: list[_Placement], destination: Path, max_pixels: int) -> dict[str, str]:
    """Decode every written file once; delete those that are not images. Returns {entry name: reason}."""

    def decode(placement: _Placement) -> str | None:
        return _decode(destination.joinpath(*placement.target), placement.entry.name, max_pixels)

    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)  # Pillow decodes without the GIL
    try:
        reasons = list(pool.map(decode, plan))
    finally:
        pool.shutdown(cancel_futures=True)
    rejected = {}
    for placement, reason in zip(plan, reasons):
        if reason:
            destination.joinpath(*placement.target).unlink()
            rejected[placement.entry.name] = reason
    return rejected


def _decode(path: Path, name: str, max_pixels: int) -> str | None:
    """Return why the file is not a usable image, or None. An oversized image refuses the upload."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height <= max_pixels:  # measured from the header, before any pixel is decoded
                image.load()
    except Image.DecompressionBombError as exc:
        raise Invalid(f"Image {name!r} is too large: {exc}", code="image_too_large") from exc
    except Image.UnidentifiedImageError:
        return f"not a {', '.join(IMAGE_FORMATS)} image"
    except Exception as exc:  # Pillow's decoders raise many exception types on malformed data
        return str(exc).replace(str(path), name) or type(exc).__name__
    if width * height > max_pixels:
        raise Invalid(
            f"Image {name!r} is {width}x{height} pixels, more than the limit of {max_pixels}.",
            code="image_too_large",
        )
    return None


# -- counting -----------------------------------------------------------------------------------


def _count_images(plan: list[_Placement], rejected: dict[str, str], destination: Path) -> Counter:
    counts: Counter = Counter()
    for placement in plan:
        if placement.entry.name not in rejected:
            counts[placement.target[:2]] += 1
    # A class folder whose files were all rejected would break torchvision's ImageFolder.
    for split_dir in destination.iterdir():
        for class_dir in split_dir.iterdir():
            if not counts[(split_dir.name, class_dir.name)]:
                shutil.rmtree(class_dir)
        if not any(split_dir.iterdir()):
            split_dir.rmdir()
    return counts


def _check_classes(counts: Counter, rejected: dict[str, str], min_images: int, warnings: list[str]) -> list[dict]:
    names = sorted({cls for (_, cls), n in counts.items() if n})
    if not names:
        message = "The archive contains no usable images; put them in one folder per class (cats/1.jpg, dogs/2.jpg)."
        if rejected:
            message += f" {len(rejected)} file(s) were not readable images (see details)."
        details = [{"file": name, "reason": reason} for name, reason in rejected.items()]
        raise Invalid(message, code="no_images", details=details)
    if len(names) < 2:
        raise Invalid(
            f"Only one class ({names[0]!r}) has images; a classifier needs at least two class folders.",
            code="single_class",
        )
    classes = [{"name": n, "train": counts[("train", n)], "val": counts[("val", n)]} for n in names]
    small = [c for c in classes if c["train"] + c["val"] < min_images]
    if small:
        listed = ", ".join(f"{c['name']!r} has {c['train'] + c['val']}" for c in small)
        raise Invalid(
            f"Each class needs at least {min_images} images: {listed}.",
            code="class_too_small",
            details=[{"class": c["name"], "images": c["train"] + c["val"]} for c in small],
        )
    for c in classes:
        if not c["train"]:
            warnings.append(f"Class {c['name']!r} has validation images but no training images.")
    return classes
