"""The HTTP face of the service: FastAPI endpoints over a ``HeadSet`` and a ``DynamicBatcher``.

``POST /score``: one or several images -> per image the primary head's score, predicted tier, P(S)..P(C)
and percentile, and every head's (``heads``). ``POST /compare``: two images -> which is better and
P(first is better). ``POST /explain``: per image, the per-patch map of ``Scorer.explain`` and its overlay.
``GET /health``: 503 until the model is loaded, then 200. ``GET /info``: heads, backbone, device, batching.

Why FastAPI with mirip's own batcher and not LitServe: LitServe batches *requests* (one decoded request is
one item of a batch), so a request of five drawings and one of three are a batch of two items of uneven
size; mirip fuses *images* across requests into backbone batches of at most ``max_batch_size``. LitServe
also runs the model in spawned worker processes fed through queues, while several heads here share one
backbone in one process. The rest LitServe would give (FastAPI/uvicorn, an API key, a payload limit, a
health check that waits for the model) is a few lines each below.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import mirip
from mirip.serve.batcher import DynamicBatcher, Overloaded
from mirip.serve.config import ServeConfig
from mirip.serve.heads import HeadSet
from mirip.serve.uploads import RequestError, decode_all, read_uploads

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
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class Service:
    """What the endpoints share: the heads once loaded, the batcher, the loading state."""

    def __init__(self, config: ServeConfig, load: Callable[[], HeadSet],
                 on_failed: Optional[Callable[[str], None]] = None):
        self.config, self._load, self._on_failed = config, load, on_failed
        self.heads: Optional[HeadSet] = None
        self.batcher: Optional[DynamicBatcher] = None
        self.error: Optional[str] = None
        self.started = time.time()
        self.load_seconds: Optional[float] = None
        self.preprocessor = None  # set with the heads
        self.model_lock = threading.Lock()  # scoring batches and explanations take turns on the backbone

    def load(self) -> None:
        t0 = time.perf_counter()
        try:
            heads = self._load()
        except BaseException as exc:  # reported by /health; the process stays up to say why
            self.error = f"{exc.__class__.__name__}: {exc}"
            if self._on_failed is not None:
                self._on_failed(self.error)
            return
        cfg = self.config

        def run(batch):
            with self.model_lock:
                return heads.score_batch(batch)

        self.batcher = DynamicBatcher(run, cfg.max_batch_size, cfg.batch_timeout_ms / 1000.0, cfg.max_queue)
        # Uploads decode with the primary head's preprocessing and the service's pixel limit.
        self.preprocessor = dataclasses.replace(heads.preprocessor, max_pixels=cfg.max_image_pixels)
        self.heads, self.load_seconds = heads, time.perf_counter() - t0

    def ready(self) -> HeadSet:
        if self.heads is None:
            raise RequestError(503, "the model is still loading" if self.error is None
                               else f"the model failed to load: {self.error}",
                               state="failed" if self.error else "loading")
        return self.heads

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


def _authorised(request: Request, key: Optional[str]) -> bool:
    if key is None:
        return True
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def create_app(config: ServeConfig, load: Optional[Callable[[], HeadSet]] = None, background: bool = True,
               on_failed: Optional[Callable[[str], None]] = None) -> FastAPI:
    """The service's ASGI app. ``load`` builds the heads (default: ``HeadSet.load`` of the config's
    checkpoints); with ``background`` it runs after start-up, so ``/health`` answers 503 until it is done.
    ``on_failed(error)`` is called if loading fails (the script stops the server with it)."""
    if load is None:
        def load():
            return HeadSet.load(config.checkpoints, backbone=config.backbone, random_init=config.random_init,
                                device=config.device, precision=config.precision)
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

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path not in OPEN_PATHS and not _authorised(request, config.api_key):
            return JSONResponse({"error": "missing or wrong API key: send it as the X-API-Key header "
                                          "(or Authorization: Bearer <key>)"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="mirip"'})
        return await call_next(request)

    @app.get("/health")
    async def health():
        if service.heads is not None:
            return {"status": "ready", "load_seconds": service.load_seconds}
        if service.error is not None:
            return JSONResponse({"status": "failed", "error": service.error}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/info")
    async def info():
        heads = service.ready()
        primary = heads.primary
        return {"service": "mirip", "version": mirip.__version__, "heads": heads.identities(),
                "device": str(primary.device), "precision": primary.model.feature_extractor.precision,
                "preprocessing": primary.preprocessor.config(), "notes": primary.notes,
                "batching": {"max_batch_size": config.max_batch_size, "batch_timeout_ms": config.batch_timeout_ms,
                             "max_queue": config.max_queue, "waiting": service.batcher.waiting,
                             **service.batcher.stats.as_dict()},
                "config": config.public(), "memory": _memory(primary.device),
                "uptime_s": round(time.time() - service.started, 3)}

    async def _scores(request: Request, keys=("images",)):
        heads = service.ready()
        t0 = time.perf_counter()
        uploads = await read_uploads(request, config.max_images, config.max_image_bytes, keys)
        decoded = await run_in_threadpool(decode_all, uploads, service.preprocessor)
        t1 = time.perf_counter()
        try:
            futures = service.batcher.submit([t for _, t in decoded])
        except Overloaded as exc:
            raise RequestError(503, f"the service is busy ({exc}); retry shortly") from None
        scores = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        timing = {"decode_ms": 1000 * (t1 - t0), "model_ms": 1000 * (time.perf_counter() - t1)}
        return heads, uploads, decoded, scores, timing

    @app.post("/score")
    async def score(request: Request):
        heads, uploads, _, scores, timing = await _scores(request)
        per_head = [heads.tier_fields(h, [s[h] for s in scores]) for h in range(len(heads.scorers))]
        idents = heads.identities()
        results = []
        for i, (u, s) in enumerate(zip(uploads, scores)):
            rows = [{**idents[h], "score": s[h], **per_head[h][i]} for h in range(len(idents))]
            primary = {k: v for k, v in rows[0].items() if k not in idents[0]}
            results.append({"index": u.index, "image": u.name, **primary, "heads": rows})
        return {"model": idents[0], "results": results, "timing": timing}

    @app.post("/compare")
    async def compare(request: Request):
        heads, uploads, _, scores, timing = await _scores(request, keys=("a", "b"))
        if len(uploads) != 2:
            raise RequestError(400, f"compare takes exactly two images (a, b), got {len(uploads)}",
                               images=len(uploads))
        out = []
        for h, (scorer, ident) in enumerate(zip(heads.scorers, heads.identities())):
            a, b = scores[0][h], scores[1][h]
            p = scorer.calibration.prob_first_better(a, b) if scorer.calibration is not None else None
            out.append({**ident, "score_a": a, "score_b": b, "better": "a" if a > b else "b" if b > a else "tie",
                        "prob_a_better": None if p is None else float(p)})
        return {"a": uploads[0].name, "b": uploads[1].name, **{k: out[0][k] for k in
                ("score_a", "score_b", "better", "prob_a_better")}, "model": heads.identities()[0],
                "heads": out, "timing": timing}

    @app.post("/explain")
    async def explain(request: Request, overlay: bool = True, head: int = 0):
        heads = service.ready()
        if not 0 <= head < len(heads.scorers):
            raise RequestError(400, f"head must be 0..{len(heads.scorers) - 1}, got {head}", field="head")
        uploads = await read_uploads(request, config.max_images, config.max_image_bytes)
        decoded = await run_in_threadpool(decode_all, uploads, service.preprocessor)
        scorer = heads.scorers[head]

        def run():
            with service.model_lock:
                return scorer.explain_images([(u.name, img) for u, (img, _) in zip(uploads, decoded)],
                                             steps=config.explain_steps)
        exps = await run_in_threadpool(run)
        results = []
        for u, (img, _), exp in zip(uploads, decoded, exps):
            row = {"index": u.index, "image": u.name, **exp.to_dict()}
            row.pop("path", None)
            if overlay:
                row["overlay_png_base64"] = _png_base64(exp, img)
            results.append(row)
        return {"model": heads.identities()[head], "results": results}

    return app


def _memory(device) -> dict:
    """What this replica holds: peak resident memory, and on CUDA the peak allocated by torch."""
    import resource

    import torch

    out = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # Linux: KiB
    if str(device).startswith("cuda"):
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def _png_base64(exp, img) -> str:
    import base64
    import io

    from mirip.heatmap import render_explanation

    buf = io.BytesIO()
    render_explanation(exp, img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def endpoints(app: FastAPI) -> List[str]:
    return sorted({getattr(r, "path", "") for r in app.routes} - {""})
