"""The dashboard's web app: server-rendered pages and the JSON API they are built from.

Every read opens the collector's database read-only, per request (the collector keeps writing; the
database is in WAL mode). The one action, POST /api/rollback, needs [serve] token as a bearer token."""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, TypeAdapter

from agent.contract import cli_errors
from cloud.config import FleetConfig
from cloud.dashboard import svg, views
from cloud.duration import parse_duration
from cloud.fleetdb import FleetDB
from cloud.rolloutdb import RolloutDB

TEMPLATES = Jinja2Templates(directory=Path(__file__).with_name("templates"))
EVENTS_SHOWN = 100
_bearer = HTTPBearer(auto_error=False)
_ROWS = TypeAdapter(list[dict[str, Any]])


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    s = max(0, int(now - ts))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"


def _clock(ts: float | None) -> str:
    return "-" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


TEMPLATES.env.globals.update(ago=_ago, clock=_clock)


def create_app(cfg: FleetConfig) -> FastAPI:
    # No /docs or /redoc: they load their scripts from a CDN, and nothing here may leave the host.
    app = FastAPI(title="fleet", docs_url=None, redoc_url=None)
    app.state.cfg = cfg
    app.state.token = cfg.serve.secret()  # read once: a token_file that cannot be read fails the start
    app.include_router(_api())
    app.include_router(_pages())
    return app


def _db(request: Request) -> Iterator[FleetDB]:
    target = request.app.state.cfg.collector.database  # an SQLite file (opened read-only) or a URL
    db = FleetDB(target) if isinstance(target, str) else FleetDB.read_only(target)
    try:
        yield db
    finally:
        db.close()


DB = Annotated[FleetDB, Depends(_db)]
Name = Annotated[str | None, Query(max_length=128)]


def _json(rows: list[dict[str, Any]]) -> Response:
    return Response(_ROWS.dump_json(rows), media_type="application/json")


def _since(since: str) -> float:
    try:
        return parse_duration(since)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None


def _api() -> APIRouter:
    api = APIRouter(prefix="/api")

    # Encoded by pydantic-core in one call: FastAPI's validate-then-encode of 10,000 devices, or
    # json.dumps, took as long as reading them (9 against 36-45 ms of CPU).
    @api.get("/devices", response_class=JSONResponse)
    def devices(db: DB) -> Response:
        return _json(views.devices(db))

    @api.get("/rollouts", response_class=JSONResponse)
    def rollouts(db: DB) -> Response:
        return _json(views.rollouts(views.devices(db), RolloutDB(db).all()))

    @api.get("/latency")
    def latency(db: DB, channel: Name = None, version: Name = None, device: Name = None, since: str = "24h") -> Any:
        return views.latency_report(db, _since(since), channel, version, device)

    @api.get("/events")
    def events(
        db: DB, device: Name = None, version: Name = None, limit: Annotated[int, Query(ge=1, le=10000)] = 200
    ) -> list[dict[str, Any]]:
        return db.events(device or None, limit, version or None)[::-1]  # newest first; empty: no filter

    @api.post("/rollback")
    def rollback(
        body: RollbackRequest,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> dict[str, Any]:
        _authorise(request.app.state.token, credentials)
        from cloud.publish import rollback

        cfg: FleetConfig = request.app.state.cfg
        try:
            ann = rollback(cfg, body.channel, body.to_version, sign_key=cfg.serve.sign_key)
        except Exception as err:
            known = cli_errors.explain(err)  # what `fleet rollback` would say, and how it would exit
            if known is None:
                raise
            raise HTTPException(503 if known[0] == cli_errors.EXIT_UNREACHABLE else 400, known[1]) from None
        return {"channel": ann.channel, "sequence": ann.sequence, "version": ann.manifest.version}

    return api


class RollbackRequest(BaseModel):
    channel: str
    to_version: str


def _authorise(token: str | None, credentials: HTTPAuthorizationCredentials | None) -> None:
    if token is None:
        raise HTTPException(403, "this dashboard is read-only: set [serve] token or token_file in the fleet config")
    given = "" if credentials is None else credentials.credentials
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "a valid bearer token is needed", headers={"WWW-Authenticate": "Bearer"})


def _pages() -> APIRouter:
    pages = APIRouter(default_response_class=HTMLResponse)

    @pages.get("/")
    def overview(request: Request, db: DB, device: Name = None, version: Name = None) -> Any:
        rows = views.devices(db)
        now = time.time()
        sparks = views.sparklines(db, now)
        return TEMPLATES.TemplateResponse(
            request,
            "overview.html",
            {
                "devices": rows,
                "sparks": {d: svg.sparkline(points) for d, points in sparks.items()},
                "rollouts": views.rollouts(rows, RolloutDB(db).all()),
                "events": db.events(device or None, EVENTS_SHOWN, version or None)[::-1],  # an empty field: no filter
                "filter": {"device": device or "", "version": version or ""},
                "now": now,
            },
        )

    @pages.get("/devices/{device_id}")
    def device(request: Request, db: DB, device_id: str, since: str = "24h") -> Any:
        rows = views.devices(db, device_id)
        if not rows:
            raise HTTPException(404, f"no device {device_id!r} in the collector's database")
        window = _since(since)
        return TEMPLATES.TemplateResponse(
            request,
            "device.html",
            {
                "d": rows[0],
                "chart": svg.latency_chart(views.device_series(db, device_id, window)),
                "latency": views.latency_report(db, window, None, None, device_id)["versions"],
                "events": db.events(device_id, EVENTS_SHOWN)[::-1],
                "since": since,
                "now": time.time(),
            },
        )

    return pages
