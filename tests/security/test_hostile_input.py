"""Hostile uploads over HTTP: the tar-filter CVE family, zip tricks, bombs and Unicode tricks.

Every case goes through the API (in-process, the real app and database) with the server's default
limits. Each is refused with a 4xx naming the problem, or neutralised (accepted without the bad
part); either way the data directory holds nothing new but a finished dataset, nothing is written
outside it, and the server keeps serving. Fake bytes are the point here: these archives and images
are made by hand because real ones must not exist.
"""

import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.archives import tar_bytes, tar_member, zip_bytes, zip_symlink
from tests.conftest import HYMENOPTERA
from tests.uploads import ingest
from tests.security.hostile_images import (
    gif_header,
    image_bytes,
    png_header,
    tiff_header,
)

REAL_JPEGS = sorted((HYMENOPTERA / "train" / "ants").iterdir())[:6] + sorted((HYMENOPTERA / "train" / "bees").iterdir())[:6]


def good_files() -> dict[str, bytes]:
    """Six real hymenoptera images per class: a dataset the server accepts."""
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in REAL_JPEGS}


GOOD = good_files()
DEEP = "ants/" + "d/" * 300 + "x.jpg"
JPEG = REAL_JPEGS[0].read_bytes()

# (id, archive bytes, expected status)
REFUSED = [
    ("tar-symlink-escape", tar_bytes(GOOD, [tar_member("ants/evil", type=tarfile.SYMTYPE, linkname="../../../../etc/passwd")])),
    ("tar-symlink-absolute", tar_bytes(GOOD, [tar_member("ants/evil", type=tarfile.SYMTYPE, linkname="/etc/passwd")])),
    ("tar-hardlink-outside", tar_bytes(GOOD, [tar_member("ants/evil", type=tarfile.LNKTYPE, linkname="/etc/passwd")])),
    ("tar-hardlink-inside", tar_bytes(GOOD, [tar_member("ants/twin.jpg", type=tarfile.LNKTYPE, linkname=next(iter(GOOD)))])),
    ("tar-link-to-link", tar_bytes(GOOD, [tar_member("ants/l1", type=tarfile.SYMTYPE, linkname="l2"),
                                          tar_member("ants/l2", type=tarfile.SYMTYPE, linkname="/etc")])),
    ("tar-file-through-symlinked-dir", tar_bytes(GOOD, [tar_member("ants/d", type=tarfile.SYMTYPE, linkname="/tmp"),
                                                        tar_member("ants/d/x.jpg", JPEG)])),
    ("tar-chardev", tar_bytes(GOOD, [tar_member("ants/tty", type=tarfile.CHRTYPE, devmajor=5, devminor=0)])),
    ("tar-blockdev", tar_bytes(GOOD, [tar_member("ants/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0)])),
    ("tar-fifo", tar_bytes(GOOD, [tar_member("ants/pipe", type=tarfile.FIFOTYPE)])),
    ("tar-absolute-name", tar_bytes(GOOD, [tar_member("/tmp/evil.jpg", JPEG)])),
    ("tar-dotdot-name", tar_bytes(GOOD, [tar_member("../evil.jpg", JPEG)])),
    ("tar-dotdot-inside-name", tar_bytes(GOOD, [tar_member("ants/../../evil.jpg", JPEG)])),
    ("tar-duplicate-overwrites", tar_bytes(GOOD, [tar_member(next(iter(GOOD)), JPEG[:100])])),
    ("tar-pax-path-escape", tar_bytes(GOOD, [tar_member("ants/ok.jpg", JPEG, pax_headers={"path": "../pax.jpg"})])),
    ("tar-gnu-longname-escape", tar_bytes(GOOD, [tar_member("../" + "x" * 150 + ".jpg", JPEG)], format=tarfile.GNU_FORMAT)),
    ("tar-control-chars", tar_bytes(GOOD, [tar_member("ants/\x1b[31mred.jpg", JPEG)])),
    ("tar-deep-path", tar_bytes(GOOD, [tar_member(DEEP, JPEG)])),
    ("zip-dotdot", zip_bytes(GOOD | {"../evil.jpg": JPEG})),
    ("zip-absolute", zip_bytes(GOOD | {"/tmp/evil.jpg": JPEG})),
    ("zip-backslash-dotdot", zip_bytes(GOOD | {"..\\evil.jpg": JPEG})),
    ("zip-drive-letter", zip_bytes(GOOD | {"C:/evil.jpg": JPEG})),
    ("zip-symlink", zip_bytes(GOOD, [zip_symlink("ants/evil", "/etc/passwd")])),
    ("zip-duplicate", zip_bytes(GOOD, [(next(iter(GOOD)), JPEG[:100])])),
    ("zip-rtl-override", zip_bytes(GOOD | {"ants/\u202egpj.exe": JPEG})),
    ("zip-zero-width-class", zip_bytes(GOOD | {"an\u200bts/x.jpg": JPEG})),
    ("zip-nfc-nfd-twins", zip_bytes(GOOD | {"ants/caf\u00e9.jpg": JPEG, "ants/cafe\u0301.jpg": JPEG})),
    ("zip-case-twins", zip_bytes(GOOD | {"ants/Same.jpg": JPEG, "ants/sAME.jpg": JPEG})),
    ("zip-deep-path", zip_bytes(GOOD | {DEEP: JPEG})),
    ("png-pixel-bomb", zip_bytes(GOOD | {"ants/bomb.png": png_header(100_000, 100_000)})),
    ("png-negative-width", zip_bytes(GOOD | {"ants/negative.png": png_header(2**31, 10)})),
    ("png-over-limit", zip_bytes(GOOD | {"ants/big.png": png_header(9_000, 9_000)})),
    ("gif-pixel-bomb", zip_bytes(GOOD | {"ants/bomb.gif": gif_header(65_535, 65_535)})),
    ("tiff-pixel-bomb", zip_bytes(GOOD | {"ants/bomb.tif": tiff_header(200_000, 200_000)})),
    ("not-an-archive", b"%PDF-1.7 not an archive"),
]

# Accepted without the bad part: the rest of the dataset is fine.
NEUTRALISED = [
    # zipfile ends a name at its first NUL, as the zip format's C readers do: "ants/evil" is kept
    # as a name, then skipped as not an image.
    ("zip-nul-in-name", zip_bytes(GOOD | {"ants/evil\x00.jpg": b"<script>"}), "evil"),
    # 64 MiB of zeros behind a .jpg name: within the archive-wide ratio limit, then not an image.
    ("zip-zeros-as-jpeg", zip_bytes(GOOD | {"ants/zeros.jpg": b"\0" * 64 * 1024**2}), "zeros.jpg"),
    ("nested-zip", zip_bytes(GOOD | {"ants/inner.zip": zip_bytes(GOOD)}), "inner.zip"),
    ("nested-tar", zip_bytes(GOOD | {"bees/inner.tar.gz": tar_bytes(GOOD)}), "inner.tar.gz"),
    ("png-zero-width", zip_bytes(GOOD | {"ants/zero.png": png_header(0, 10)}), "zero.png"),
    ("gif-zero-size", zip_bytes(GOOD | {"ants/zero.gif": gif_header(0, 0)}), "zero.gif"),
    ("format-not-allowed-ico", zip_bytes(GOOD | {"ants/icon.jpg": image_bytes("ICO")}), "icon.jpg"),
    ("format-not-allowed-pcx", zip_bytes(GOOD | {"ants/picture.jpg": image_bytes("PCX")}), "picture.jpg"),
    ("format-not-allowed-eps", zip_bytes(GOOD | {"ants/page.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"}), "page.jpg"),
]


def listing(root: Path) -> set[str]:
    """Every file below root, but the database's own (their journals come and go)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not p.name.endswith((".db", "-wal", "-shm", "-journal"))}  # fmt: skip


def upload(client, content: bytes) -> tuple[int, dict]:
    """The status code and the dataset (after its ingest, in this process) or the error body."""
    response = client.post("/v1/datasets", files={"file": ("upload.bin", content)})
    if response.status_code != 202:
        return response.status_code, response.json()
    return response.status_code, ingest(client, response)


@pytest.mark.parametrize(("content",), [(c,) for _, c in REFUSED], ids=[i for i, _ in REFUSED])
def test_hostile_archive_is_refused_and_nothing_is_written(client, settings_env, content):
    root = settings_env.parent  # the data directory and everything beside it
    before = listing(root)
    status, body = upload(client, content)
    assert 400 <= status < 500 or body["status"] == "failed", body  # refused at once, or by its ingest
    assert body["error"]["message"]
    assert listing(root) == before
    assert [d["status"] for d in client.get("/v1/datasets").json()["data"]] in ([], ["failed"])
    assert upload(client, zip_bytes(GOOD))[1]["status"] == "ready"  # and the server goes on serving


@pytest.mark.parametrize(("content", "dropped"), [(c, d) for _, c, d in NEUTRALISED], ids=[i for i, _, _ in NEUTRALISED])
def test_hostile_part_is_dropped_and_the_rest_accepted(client, settings_env, content, dropped):
    root = settings_env.parent
    before = listing(root)
    _, dataset = upload(client, content)
    assert dataset["status"] == "ready", dataset
    assert dataset["num_images"] == len(GOOD) and any(dropped in w for w in dataset["warnings"])
    new = listing(root) - before
    # Only the kept images, under datasets/<sha256 of their content>.
    assert new and all(re.match(r"var/datasets/[0-9a-f]{64}/", path) for path in new), new
    assert not any(dropped in path for path in new)


def test_an_archive_of_100k_tiny_entries_fails_and_leaves_nothing(client, settings_env):
    root = settings_env.parent
    entries = {f"ants/{i}.jpg": b"x" for i in range(100_000)}
    before = listing(root)
    _, dataset = upload(client, zip_bytes(entries))
    # Within the entry limit (200,000), so unpacked and decoded: not one of them is an image.
    assert dataset["status"] == "failed" and dataset["error"]["code"] == "no_images", dataset
    assert listing(root) == before


def test_exif_orientation_is_applied_everywhere_pixels_are_decoded(tmp_path):
    from app.ml.data import load_rgb
    from app.serving.predictor import decode_image

    # Stored 40x20, left half red and right half blue, with "rotate 90° clockwise to display".
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, "JPEG", exif=exif, quality=95)

    for upright in (load_rgb(path), decode_image("rotated.jpg", path.read_bytes(), 10**6)):
        assert upright.size == (20, 40)  # displayed portrait
        top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
        assert top[0] > 200 and top[2] < 60  # the red half is on top after a clockwise turn
        assert bottom[2] > 200 and bottom[0] < 60
