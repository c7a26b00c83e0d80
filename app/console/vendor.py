"""The console's one third-party browser library, fetched from the npm registry when the project
is installed (`make install`, the Dockerfile), never from a CDN at run time.

uPlot draws the live training curves: small (50 kB), no dependencies, MIT, and it styles itself
through the DOM rather than inline <style> (so the console's Content-Security-Policy stays strict).
It is pinned here with the registry's sha512 integrity and unpacked into static/vendor/, which git
ignores (its code is not ours to commit). Run `python -m app.console.vendor` to fetch it again.
An install-time tool: the server never imports or runs it (tests/security/test_no_unsafe_loading.py).
"""

import base64
import hashlib
import io
import os
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VENDOR_DIR = Path(__file__).parent / "static" / "vendor"


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str  # the registry's `dist.integrity` of this version's tarball
    license: str
    files: dict[str, str]  # path in the tarball's package/ -> name in static/vendor/

    def tarball_url(self, registry: str) -> str:
        return f"{registry.rstrip('/')}/{self.name}/-/{self.name}-{self.version}.tgz"


UPLOT = NpmPackage(
    name="uplot",
    version="1.6.32",
    integrity="sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==",
    license="MIT",
    files={"dist/uPlot.esm.js": "uPlot.esm.js", "dist/uPlot.min.css": "uPlot.min.css", "LICENSE": "uPlot.LICENSE"},
)
PACKAGES = (UPLOT,)


def stamp(package: NpmPackage) -> Path:
    return VENDOR_DIR / f"{package.name}-{package.version}.installed"


def fetch(package: NpmPackage, registry: str) -> None:
    if stamp(package).exists():
        return
    with urllib.request.urlopen(package.tarball_url(registry), timeout=60) as response:
        tarball = response.read()
    algorithm, expected = package.integrity.split("-", 1)
    if base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode() != expected:
        raise SystemExit(f"{package.name}@{package.version}: the tarball does not match its pinned integrity")
    VENDOR_DIR.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
        for inside, name in package.files.items():
            (VENDOR_DIR / name).write_bytes(archive.extractfile(f"package/{inside}").read())
    stamp(package).write_text(f"{package.name}@{package.version} ({package.license}) from {registry}\n")


def main() -> None:
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org")  # as npm itself reads it
    for package in PACKAGES:
        fetch(package, registry)
        print(f"{package.name}@{package.version} in {VENDOR_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main()
