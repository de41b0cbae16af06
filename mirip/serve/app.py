"""The service's ASGI app: FastAPI over ``mirip.serve.endpoints``, with a body limit and an API key.

Why FastAPI with mirip's own batcher and not LitServe: LitServe batches *requests* (one decoded request is
one item of a batch), so a request of five drawings and one of three are a batch of two items of uneven
size; mirip fuses *images* across requests into backbone batches of at most ``max_batch_size``. LitServe
also runs the model in spawned worker processes fed through queues, while several heads here share one
backbone in one process. The rest LitServe would give (FastAPI/uvicorn, an API key, a payload limit, a
health check that waits for the model) is a few lines each below.
"""

from __future__ import annotations

import hmac
import json
import threading
from contextlib import asynccontextmanager
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

import mirip
from mirip.judging.desk import JudgingDesk
from mirip.serve.config import ServeConfig
from mirip.serve.endpoints import ROUTES
from mirip.serve.heads import HeadSet
from mirip.serve.judge import JUDGE_PATHS, add_judging
from mirip.serve.service import Service
from mirip.serve.uploads import RequestError

OPEN_PATHS = ("/health", "/docs", "/openapi.json")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before it is read into memory, whether
    it declares its length or streams it in chunks."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, _too_large(int(declared), self.limit))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, _too_large(seen, self.limit)["error"])
            return message

        return await self.app(scope, limited, send)


def _too_large(size: int, limit: int) -> dict:
    return {"error": f"the request body is over {limit} bytes (at least {size}); send fewer or smaller images",
            "max_request_bytes": limit}


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def authorised(request: Request, key: Optional[str]) -> bool:
    """No key set, or the request's X-API-Key (or Authorization: Bearer) equals it (compared in constant time)."""
    if key is None:
        return True
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def _auth_middleware(key: Optional[str], own_auth: tuple = ()):
    """``own_auth``: path prefixes that check their own credentials (the judges' tokens), not the API key."""
    async def check(request: Request, call_next):
        path = request.url.path
        if path not in OPEN_PATHS and not path.startswith(own_auth) and not authorised(request, key):
            return JSONResponse({"error": "missing or wrong API key: send it as the X-API-Key header "
                                          "(or Authorization: Bearer <key>)"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="mirip"'})
        return await call_next(request)
    return check


async def _http_error(request: Request, exc: HTTPException):
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _invalid(request: Request, exc: RequestValidationError):
    """A query parameter of the wrong type (``?head=abc``): 400 in the service's own shape, naming it."""
    first = exc.errors()[0]
    where, name = (list(first.get("loc", ())) + ["request", "?"])[:2]
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return JSONResponse({"error": f"{where} parameter {name}: {first.get('msg')}, got {first.get('input')!r}{more}",
                         "field": name}, status_code=400)


async def _refused(request: Request, exc: RequestError):
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(config: ServeConfig, load: Optional[Callable[[], HeadSet]] = None, background: bool = True,
               on_failed: Optional[Callable[[str], None]] = None, judging: Optional[JudgingDesk] = None) -> FastAPI:
    """The service's ASGI app. ``load`` builds the heads (default: ``HeadSet.load`` of the config's
    checkpoints); with ``background`` it runs after start-up, so ``/health`` answers 503 until it is done.
    ``on_failed(error)`` is called if loading fails (the script stops the server with it). With ``judging``,
    the judging page and its endpoints (``mirip.serve.judge``) come beside the scoring ones."""
    if load is None:
        def load():
            return HeadSet.load(config.checkpoints, backbone=config.backbone, random_init=config.random_init,
                                device=config.device, precision=config.precision, engine=config.engine,
                                engine_cache=config.engine_cache)
    service = Service(config, load, on_failed)

    @asynccontextmanager
    async def lifespan(app):
        if background:
            threading.Thread(target=service.load, name="mirip-load", daemon=True).start()
        else:
            service.load()
        yield
        service.close()

    app = FastAPI(title="mirip scoring service", version=mirip.__version__, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    app.middleware("http")(_auth_middleware(config.api_key, JUDGE_PATHS if judging is not None else ()))  # added last: runs first, before the body is read
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(RequestError, _refused)
    for method, path, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method])
    if judging is not None:
        add_judging(app, judging)
    return app

