"""Archive builders shared by every test module: one place that turns files into zip or tar uploads.

Two kinds of input: a real ImageFolder tree read in place (`zip_tree`, for the hymenoptera photos
in ../shared, never copied), and a `{name in archive: bytes}` dict (`zip_bytes`, `tar_bytes`,
`write_zip`, `write_tar`) for synthetic or hand-made hostile content. Names are written exactly as
given, duplicates and `..` included: hostile archives are built with these same functions.
"""

import io
import tarfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

# An extra archive member: a ZipInfo or TarInfo with its own attributes (a symlink, a device, a PAX
# header...) and its data.
ZipMember = tuple[zipfile.ZipInfo | str, bytes]
TarMember = tuple[tarfile.TarInfo, bytes]


def zip_tree(source: Path, archive: Path, *, per_class: dict[str, int] | None = None) -> Path:
    """Zip an ImageFolder tree (read in place) under its own folder name, e.g. `hymenoptera/train/ants/x.jpg`.

    `per_class` keeps only the first N files (sorted by name) of each class folder, per split:
    `{"train": 12, "val": 8}` takes 12 images of each class from train/ and 8 from val/.
    """
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as out:
        for class_dir in sorted(p for p in source.rglob("*") if p.is_dir()):
            files = sorted(f for f in class_dir.iterdir() if f.is_file())
            if per_class is not None:
                files = files[: per_class.get(class_dir.parent.name, len(files))]
            for file in files:
                out.write(file, arcname=f"{source.name}/{file.relative_to(source)}")
    return archive


def zip_bytes(
    files: dict[str, bytes], extra: Iterable[ZipMember] = (), *, compression: int = zipfile.ZIP_DEFLATED
) -> bytes:
    """A zip of `files` ({name: data}, in order), then the `extra` members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # duplicates are sometimes the point
        for name, data in files.items():
            archive.writestr(name, data)
        for info, data in extra:
            archive.writestr(info, data)
    return buffer.getvalue()


def write_zip(path: Path, files: dict[str, bytes], extra: Iterable[ZipMember] = (), **options) -> Path:
    path.write_bytes(zip_bytes(files, extra, **options))
    return path


def zip_symlink(name: str, target: str) -> ZipMember:
    """A zip entry that unzip would create as a symbolic link to `target`."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: the mode bits below are read
    info.external_attr = 0o120777 << 16  # S_IFLNK | rwxrwxrwx
    return info, target.encode()


def tar_member(name: str, data: bytes = b"", **attrs) -> TarMember:
    """A tar member with any TarInfo attribute set (type, linkname, devmajor, pax_headers...)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def tar_bytes(
    files: dict[str, bytes], extra: Iterable[TarMember] = (), *, mode: str = "w:gz", format: int = tarfile.PAX_FORMAT
) -> bytes:
    """A tar (gzipped unless `mode` says otherwise) of `files` ({name: data}), then the `extra` members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=format) as archive:
        for info, data in [tar_member(name, data) for name, data in files.items()] + list(extra):
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def write_tar(path: Path, files: dict[str, bytes], extra: Iterable[TarMember] = (), **options) -> Path:
    path.write_bytes(tar_bytes(files, extra, **options))
    return path


def solid_image(color: tuple[int, int, int] = (120, 40, 40), size: tuple[int, int] = (32, 32), fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def colour_dataset_zip(n: int = 5) -> bytes:
    """Two classes of solid-colour 40x40 JPEGs (`red/`, `blue/`, n each): a dataset the API accepts,
    for tests about the job, sweep and registry APIs rather than learning."""
    return zip_bytes(
        {
            f"{label}/{i}.jpg": solid_image(color, (40, 40))
            for label, color in (("red", (220, 20, 20)), ("blue", (20, 20, 220)))
            for i in range(n)
        },
        compression=zipfile.ZIP_STORED,
    )
