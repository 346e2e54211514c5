"""/docs (Swagger UI) and /redoc with their assets served by the app itself, so they work offline.

FastAPI's own pages load Swagger UI, ReDoc and a favicon from CDNs (and ReDoc
Google's fonts): blank without the internet. The assets come from the
`fastapi-offline` package (maintained, it ships current Swagger UI and ReDoc
builds); only its files are used, the pages are FastAPI's own
`get_swagger_ui_html` / `get_redoc_html` pointed at them.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"
# Swagger UI: keep the key given in "Authorize" across reloads; "Try it out" sends the example bodies.
SWAGGER_PARAMETERS = {"persistAuthorization": True, "displayRequestDuration": True}


def install(app: FastAPI) -> None:
    """Serve /docs, /docs/oauth2-redirect, /redoc and their assets (build the app with docs_url=None,
    redoc_url=None so FastAPI's CDN pages are not there too)."""
    app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs_assets")

    def prefix(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} API",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png", oauth2_redirect_url=root + "/docs/oauth2-redirect",
            swagger_ui_parameters=SWAGGER_PARAMETERS)

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = prefix(request)
        return get_redoc_html(openapi_url=root + app.openapi_url, title=f"{app.title} API",
                              redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{ASSETS}/favicon.png", with_google_fonts=False)
