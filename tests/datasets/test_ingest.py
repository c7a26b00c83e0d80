"""Archive ingestion: layouts, hostile archives, bombs and broken images.

The images here are tiny synthetic ones generated with Pillow on purpose: what is under test is the
archive handling, not the pictures. One test at the end uses the real hymenoptera dataset.
"""

import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from app.core.errors import AppError, Invalid, TooLarge, UnsupportedMedia
from app.datasets.ingest import IngestLimits, ingest_archive
from tests.archives import solid_image, tar_member, write_tar, write_zip, zip_symlink, zip_tree
from tests.conftest import HYMENOPTERA

JPEG = solid_image((200, 30, 30), (16, 16), "JPEG")
PNG = solid_image((30, 200, 30), (16, 16), "PNG")


def limits(**overrides) -> IngestLimits:
    values = dict(
        max_uncompressed_bytes=100 * 1024**2,
        max_archive_entries=1000,
        max_compression_ratio=200.0,
        max_image_pixels=10_000,
        min_images_per_class=2,
    )
    return IngestLimits(**(values | overrides))


def two_classes(n: int = 3) -> dict[str, bytes]:
    return {f"ants/a{i}.jpg": JPEG for i in range(n)} | {f"bees/b{i}.png": PNG for i in range(n)}


def refused(archive: Path, destination: Path, error: type[AppError], code: str, **limit_overrides) -> AppError:
    with pytest.raises(error) as caught:
        ingest_archive(archive, destination, limits(**limit_overrides))
    assert caught.value.code == code
    assert not destination.exists()
    return caught.value


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "staging" / "ds_1"


# -- accepted layouts ---------------------------------------------------------------------------


def test_class_layout_zip(tmp_path, dest):
    files = two_classes() | {"bees/more/deep.png": PNG}
    archive = write_zip(tmp_path / "upload.bin", files | {"empty/": b""})  # an empty class folder is not a class

    result = ingest_archive(archive, dest, limits())

    assert result.classes == [{"name": "ants", "train": 3, "val": 0}, {"name": "bees", "train": 4, "val": 0}]
    assert result.num_images == 7
    assert result.has_val_split is False
    assert result.warnings == []
    assert (dest / "train/bees/more/deep.png").read_bytes() == PNG
    assert sorted(p.name for p in dest.iterdir()) == ["train"]
    assert sorted(p.name for p in (dest / "train").iterdir()) == ["ants", "bees"]


def test_split_layout_tar_gz_with_shared_top_folder(tmp_path, dest):
    files = {f"data/train/{name}": data for name, data in two_classes().items()}
    files |= {"data/val/ants/v0.jpg": JPEG, "data/valid/bees/v1.png": PNG, "data/validation/bees/v2.png": PNG}
    files |= {"data/test/ants/t0.jpg": JPEG, "data/train/loose.jpg": JPEG}
    archive = write_tar(tmp_path / "upload.tgz", files)

    result = ingest_archive(archive, dest, limits())

    assert result.classes == [{"name": "ants", "train": 3, "val": 1}, {"name": "bees", "train": 3, "val": 2}]
    assert result.has_val_split is True
    assert (dest / "val/bees/v2.png").is_file()
    assert not (dest / "test").exists()
    assert any("test/" in w for w in result.warnings)
    assert any("data/train/loose.jpg" in w for w in result.warnings)


def test_plain_tar_is_detected_by_content(tmp_path, dest):
    archive = write_tar(tmp_path / "upload.zip", two_classes(), mode="w")
    assert ingest_archive(archive, dest, limits()).num_images == 6


def test_real_hymenoptera_dataset(tmp_path, dest):
    archive = zip_tree(HYMENOPTERA, tmp_path / "hymenoptera.zip")

    result = ingest_archive(archive, dest, limits(max_image_pixels=64_000_000, min_images_per_class=5))

    assert result.classes == [{"name": "ants", "train": 124, "val": 70}, {"name": "bees", "train": 121, "val": 83}]
    assert result.num_images == 398
    assert result.has_val_split is True
    assert len(list((dest / "val/bees").iterdir())) == 83


# -- refused before anything is written ---------------------------------------------------------


@pytest.mark.parametrize("content", [b"just some text\n" * 100, PNG, b""])
def test_not_an_archive(tmp_path, dest, content):
    upload = tmp_path / "upload.zip"
    upload.write_bytes(content)
    refused(upload, dest, UnsupportedMedia, "not_an_archive")


@pytest.mark.parametrize("name", ["../evil.jpg", "ants/../../evil.jpg", "ants\\..\\..\\evil.jpg"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_parent_directory_entry(tmp_path, dest, name, kind):
    make = write_zip if kind == "zip" else write_tar
    archive = make(tmp_path / "upload", two_classes() | {name: JPEG})
    error = refused(archive, dest, Invalid, "unsafe_archive")
    assert repr(name) in error.message
    assert not (tmp_path / "evil.jpg").exists()


@pytest.mark.parametrize("name", ["/tmp/evil.jpg", "C:/evil.jpg", "C:\\evil.jpg", "\\\\server\\evil.jpg"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_absolute_entry(tmp_path, dest, name, kind):
    make = write_zip if kind == "zip" else write_tar
    archive = make(tmp_path / "upload", two_classes() | {name: JPEG})
    refused(archive, dest, Invalid, "unsafe_archive")


def test_control_characters_in_tar_name(tmp_path, dest):
    archive = write_tar(tmp_path / "upload.tar.gz", two_classes() | {"ants/a\x1b[2J.jpg": JPEG})
    refused(archive, dest, Invalid, "unsafe_archive")


def test_nul_in_zip_name(tmp_path, dest):
    # zipfile will not write a NUL into a name, so patch the bytes (same length, both headers).
    archive = write_zip(tmp_path / "upload.zip", two_classes() | {"ants/evilXjpg": JPEG})
    archive.write_bytes(archive.read_bytes().replace(b"evilXjpg", b"evil\x00jpg"))
    refused(archive, dest, Invalid, "unsafe_archive")


def test_zip_symlink(tmp_path, dest):
    archive = write_zip(tmp_path / "upload.zip", two_classes(), [zip_symlink("ants/link.jpg", "/etc/passwd")])
    error = refused(archive, dest, Invalid, "unsafe_archive")
    assert "ants/link.jpg" in error.message


@pytest.mark.parametrize(
    "member",
    [
        tar_member("ants/link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        tar_member("ants/hard.jpg", type=tarfile.LNKTYPE, linkname="ants/a0.jpg"),
        tar_member("ants/tty", type=tarfile.CHRTYPE, devmajor=5, devminor=0),
        tar_member("ants/disk", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
        tar_member("ants/pipe", type=tarfile.FIFOTYPE),
    ],
    ids=["symlink", "hardlink", "chardev", "blockdev", "fifo"],
)
def test_tar_links_and_special_files(tmp_path, dest, member):
    archive = write_tar(tmp_path / "upload.tar.gz", two_classes(), extra=[member])
    error = refused(archive, dest, Invalid, "unsafe_archive")
    assert member[0].name in error.message


@pytest.mark.parametrize("twin", ["ants/a0.jpg", "./ants/a0.jpg", "ants//a0.jpg", "ants\\a0.jpg"])
def test_duplicate_paths(tmp_path, dest, twin):
    archive = write_zip(tmp_path / "upload.zip", two_classes(), [(twin, PNG)])
    refused(archive, dest, Invalid, "unsafe_archive")


def test_val_aliases_colliding(tmp_path, dest):
    files = {f"train/{name}": data for name, data in two_classes().items()}
    archive = write_zip(tmp_path / "upload.zip", files | {"val/ants/x.jpg": JPEG, "validation/ants/x.jpg": JPEG})
    refused(archive, dest, Invalid, "unsafe_archive")


def test_file_where_a_folder_is_needed(tmp_path, dest):
    archive = write_tar(tmp_path / "upload.tar", two_classes() | {"ants": JPEG}, mode="w")
    refused(archive, dest, Invalid, "unsafe_archive")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_entries(tmp_path, dest, kind):
    make = write_zip if kind == "zip" else write_tar
    archive = make(tmp_path / "upload", two_classes(5))
    refused(archive, dest, TooLarge, "too_many_entries", max_archive_entries=9)


def test_declared_size_over_limit(tmp_path, dest):
    archive = write_zip(tmp_path / "upload.zip", two_classes())
    refused(archive, dest, TooLarge, "archive_too_large", max_uncompressed_bytes=len(JPEG) * 3)


def test_compression_bomb(tmp_path, dest):
    archive = write_zip(tmp_path / "upload.zip", two_classes() | {"ants/zeros.jpg": bytes(50 * 1024**2)})
    assert archive.stat().st_size < 1024**2
    refused(archive, dest, Invalid, "compression_bomb", max_uncompressed_bytes=1024**3)


def test_zip_encrypted_entry(tmp_path, dest):
    archive = write_zip(tmp_path / "upload.zip", two_classes())
    data = bytearray(archive.read_bytes())
    # Set the "encrypted" flag of the first entry in its central-directory record.
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<H", data, central + 8, 0x1)
    archive.write_bytes(bytes(data))
    refused(archive, dest, UnsupportedMedia, "encrypted_archive")


def test_class_name_too_long(tmp_path, dest):
    archive = write_zip(tmp_path / "upload.zip", two_classes() | {f"{'x' * 101}/a.jpg": JPEG})
    refused(archive, dest, Invalid, "invalid_class_name")


def test_existing_destination_is_left_alone(tmp_path, dest):
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ingest_archive(write_zip(tmp_path / "upload.zip", two_classes()), dest, limits())
    assert (dest / "keep.txt").read_text() == "mine"


# -- refused after decoding ---------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims the given size; there are no real pixels behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("huge", "max_pixels", "named"),
    [
        (png_header_only(100_000, 100_000), 64_000_000, "bees/huge.png"),  # past Pillow's own bomb guard
        (png_header_only(9_000, 9_000), 64_000_000, "bees/huge.png"),  # under Pillow's, over ours
        (PNG, 100, "ants/a0.jpg"),  # every image is over a tiny limit: the first one is named
    ],
    ids=["pillow-bomb-limit", "over-our-limit", "small-limit"],
)
def test_image_over_pixel_limit(tmp_path, dest, huge, max_pixels, named):
    archive = write_zip(tmp_path / "upload.zip", two_classes() | {"bees/huge.png": huge})
    error = refused(archive, dest, Invalid, "image_too_large", max_image_pixels=max_pixels)
    assert named in error.message


def test_broken_files_are_dropped_with_a_warning(tmp_path, dest):
    files = two_classes() | {"ants/truncated.jpg": JPEG[: len(JPEG) // 2], "bees/notes.txt": b"not an image"}
    files |= {"wasps/only-broken.jpg": b"\xff\xd8\xff garbage"}
    archive = write_zip(tmp_path / "upload.zip", files)

    result = ingest_archive(archive, dest, limits())

    assert [c["name"] for c in result.classes] == ["ants", "bees"]
    assert result.num_images == 6
    assert not (dest / "train/ants/truncated.jpg").exists()
    assert not (dest / "train/bees/notes.txt").exists()
    assert not (dest / "train/wasps").exists()  # ImageFolder would choke on an empty class folder
    for name in ("ants/truncated.jpg", "bees/notes.txt", "wasps/only-broken.jpg"):
        assert sum(name in w for w in result.warnings) == 1
    assert not any(str(dest) in w for w in result.warnings)  # no server paths leak out


def test_only_non_images(tmp_path, dest):
    archive = write_tar(tmp_path / "upload.tgz", {"ants/a.txt": b"hello", "bees/b.csv": b"1,2,3"})
    error = refused(archive, dest, Invalid, "no_images")
    assert "2 file(s)" in error.message
    assert sorted(d["file"] for d in error.details) == ["ants/a.txt", "bees/b.csv"]


def test_single_class(tmp_path, dest):
    archive = write_zip(tmp_path / "upload.zip", {f"ants/a{i}.jpg": JPEG for i in range(5)})
    error = refused(archive, dest, Invalid, "single_class")
    assert "ants" in error.message


def test_class_below_minimum(tmp_path, dest):
    archive = write_zip(tmp_path / "upload.zip", two_classes(5) | {"wasps/w.jpg": JPEG})
    error = refused(archive, dest, Invalid, "class_too_small", min_images_per_class=3)
    assert "'wasps' has 1" in error.message
    assert error.details == [{"class": "wasps", "images": 1}]


def test_hidden_and_system_files_are_skipped(tmp_path, dest):
    junk = {
        "__MACOSX/ants/._a0.jpg": b"\0\5\26\7",
        "ants/.DS_Store": b"\0\0\0\1Bud1",
        ".git/config": b"[core]",
        "bees/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "bees/desktop.ini": b"[.ShellClassInfo]",
    }
    archive = write_zip(tmp_path / "upload.zip", two_classes() | junk)

    result = ingest_archive(archive, dest, limits())

    assert result.num_images == 6
    assert len(result.warnings) == 1 and "5 hidden or system file(s)" in result.warnings[0]
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == sorted(Path(n).name for n in two_classes())
