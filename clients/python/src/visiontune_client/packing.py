"""A local ImageFolder becomes a zip to upload; files are read with progress reported."""

import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from visiontune_client.errors import InvalidDatasetError

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes in all)

SPLITS = {"train", "val", "valid", "validation", "test"}  # the split folder names the server knows


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name != "__MACOSX"


def _walk(folder: Path) -> Iterator[Path]:
    """Every file below `folder`, hidden files and folders left out."""
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = [d for d in subdirectories if _visible(Path(d))]
        yield from (Path(directory, name) for name in names if _visible(Path(name)))


def image_folder_files(root: Path) -> list[Path]:
    """The files of the ImageFolder `root` (`<class>/<image>`, or `train/<class>/<image>` and
    `val/<class>/<image>`); raises InvalidDatasetError when no class subfolder holds a file."""
    if not root.is_dir():
        raise InvalidDatasetError(f"{root} is not a folder")
    subfolders = [p for p in root.iterdir() if p.is_dir() and _visible(p)]
    names = {p.name for p in subfolders}
    splits = "train" in names and names <= SPLITS
    class_folders = [c for s in subfolders for c in s.iterdir() if c.is_dir() and _visible(c)] if splits else subfolders
    if not any(next(_walk(folder), None) for folder in class_folders):
        raise InvalidDatasetError(
            f"{root} has no class subfolders with images: expected <class>/<image>, "
            "or train/<class>/<image> and val/<class>/<image>"
        )
    return sorted(_walk(root))


def pack_folder(root: Path, progress: ProgressCallback | None = None) -> Path:
    """Zip the ImageFolder `root` into a new temporary file (the caller removes it); images are
    stored as they are, already compressed. `progress` is told the bytes of files read."""
    files = image_folder_files(root)
    total, done = sum(f.stat().st_size for f in files), 0
    handle, name = tempfile.mkstemp(prefix=f"{root.name}-", suffix=".zip")
    os.close(handle)
    archive = Path(name)
    try:
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED, strict_timestamps=False) as out:
            for file in files:
                out.write(file, file.relative_to(root).as_posix())
                done += file.stat().st_size
                if progress:
                    progress(done, total)
    except BaseException:
        archive.unlink(missing_ok=True)
        raise
    return archive


class ProgressReader:
    """A binary file that reports the bytes read so far (the upload's progress); seeking back to the
    start, as a retried upload does, starts the count again."""

    def __init__(self, file: BinaryIO, progress: ProgressCallback):
        self._file = file
        self._progress = progress
        self._total = os.fstat(file.fileno()).st_size

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._progress(self._file.tell(), self._total)
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()
