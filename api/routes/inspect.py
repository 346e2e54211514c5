"""/inspect: the time-travel inspector, static HTML + JavaScript served from api/static/inspect.

No build step and nothing fetched from elsewhere: the page calls the API of the server that serves it, with
the key its user signs in with (kept in the tab's sessionStorage, sent as a Bearer header; the only thing in
a URL is a stream token). /inspect/examples/ holds the browser guide's example pages (docs/browser.md).
"""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static" / "inspect"


def install(app: FastAPI) -> None:
    @app.get("/inspect", include_in_schema=False)
    async def inspect_page() -> RedirectResponse:
        return RedirectResponse("inspect/", status_code=308)  # relative: right behind a path prefix too

    app.mount("/inspect", StaticFiles(directory=STATIC, html=True), name="inspect")
