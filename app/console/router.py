"""The web console: static files (HTML, CSS, ES modules) served by the API process at /console/.

It has no endpoints of its own. The browser calls the public /v1 API with the user's own key, like
any other client (import-linter keeps this package away from the domains and the database), so
the console can never do more than that key may. Its pages carry a strict Content-Security-Policy:
scripts and styles only from this origin's files (no inline code, no CDN), and nothing may frame it.
"""

import logging

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",  # thumbnails and dropped images, fetched with the key, shown as blob: URLs
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])  # fmt: skip
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag) each load: a new version is picked up at once
}


class ConsoleFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/console/")


def console_files() -> ConsoleFiles:
    # app/console/vendor.py leaves a stamp per library it fetched (it is not imported here: it is
    # an install-time tool, and the server fetches nothing).
    if not any((STATIC_DIR / "vendor").glob("*.installed")):  # an install that skipped `make install`'s step
        logger.warning("the web console lacks its charting library: run `python -m app.console.vendor`")
    return ConsoleFiles(directory=STATIC_DIR, html=True)
