"""Swagger UI from local files: FastAPI's default /docs loads its script from a CDN, which closed
networks (and this project's CI) cannot reach, leaving users a blank page."""

from __future__ import annotations

from importlib.resources import files
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

ASSETS_PATH = "/docs-assets"


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that parses its JSON body itself (off the event loop): the body's schema,
    registered under components by ``add_schemas``."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _amend_openapi(app: FastAPI, amend: Callable[[dict], None]) -> None:
    """Change the spec FastAPI builds, once, when it is first asked for."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            amend(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Put these models (and the models they use) under components/schemas of the spec."""

    def amend(schema: dict) -> None:
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema

    _amend_openapi(app, amend)


def drop_validation_responses(app: FastAPI) -> None:
    """FastAPI documents a 422 HTTPValidationError on every route with parameters; this service answers a bad
    parameter with its own 400 envelope (envelope.py), so those 422s and their schemas are not what it sends."""

    def amend(schema: dict) -> None:
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                ref = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
                if ref.get("$ref", "").endswith("/HTTPValidationError"):
                    del responses["422"]
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)

    _amend_openapi(app, amend)


def declare_api_key(app: FastAPI, protected: list[tuple[str, str]]) -> None:
    """With API_KEY set, the spec says so: both ways of sending the key as security schemes on the protected
    operations, which gives Swagger UI its Authorize button. Without it nothing is declared, as nothing is asked."""

    def amend(schema: dict) -> None:
        schema.setdefault("components", {})["securitySchemes"] = {
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
        for path, method in protected:
            schema["paths"][path][method]["security"] = [{"apiKeyHeader": []}, {"bearer": []}]

    _amend_openapi(app, amend)


def install_docs(app: FastAPI) -> None:
    """Serve /docs with the Swagger UI bundle shipped in the fastapi-swagger package."""
    assets = files("fastapi_swagger") / "resources"
    app.mount(ASSETS_PATH, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        )
