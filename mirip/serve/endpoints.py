"""The endpoints, each a plain async function of the request (``app.state.service`` holds the model).

``POST /score``: one or several images -> per image the primary head's score, predicted tier, P(S)..P(C)
and percentile, and every head's (``heads``). ``POST /compare``: two images -> which is better and
P(first is better). ``POST /explain``: per image, the per-patch map of ``Scorer.explain`` and its overlay.
``GET /health``: 503 until the model is loaded, then 200. ``GET /info``: heads, backbone, device, batching.
In ``/score`` and ``/explain`` an image that cannot be decoded gets an ``error`` entry in its place and the
rest are answered, unless the request asks ``?strict=true`` (then 422, as ``/compare`` always does).
"""

from __future__ import annotations

import asyncio
import base64
import io
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import mirip
from mirip.scoring.scorer import runs_in
from mirip.serve.batcher import NeverFits, Overloaded
from mirip.serve.service import Service, memory
from mirip.serve.uploads import RequestError, Unreadable, decode_all, read_uploads


def _service(request: Request) -> Service:
    return request.app.state.service


async def health(request: Request):
    service = _service(request)
    if service.heads is not None:
        return {"status": "ready", "load_seconds": service.load_seconds}
    if service.error is not None:
        return JSONResponse({"status": "failed", "error": service.error}, status_code=500)
    return JSONResponse({"status": "loading"}, status_code=503)


async def info(request: Request):
    service = _service(request)
    heads, config = service.ready(), service.config
    primary = heads.primary
    return {"service": "mirip", "version": mirip.__version__, "heads": heads.identities(),
            "backbone": primary.model.feature_extractor.info.name, "weights": primary.weights,
            "device": str(primary.device), "precision": runs_in(heads.scoring_extractor)[1],
            "engine": runs_in(heads.scoring_extractor)[0],
            "preprocessing": primary.preprocessor.config(), "notes": primary.notes,
            "batching": {"max_batch_size": config.max_batch_size, "batch_timeout_ms": config.batch_timeout_ms,
                         "max_queue": config.max_queue, "waiting": service.batcher.waiting,
                         **service.batcher.stats.as_dict()},
            "config": config.public(), "memory": memory(primary.device),
            "uptime_s": round(time.time() - service.started, 3)}


async def _scores(request: Request, keys=("images",), strict: bool = True):
    """Read, decode and score a request's images: (heads, uploads, per upload its per-head scores or its
    ``Unreadable``, timing)."""
    service = _service(request)
    heads, config = service.ready(), service.config
    t0 = time.perf_counter()
    uploads = await read_uploads(request, config.max_images, config.max_image_bytes, keys)
    service.arriving(len(uploads))  # the batcher waits for these rather than run a batch without them
    try:
        decoded = await run_in_threadpool(decode_all, uploads, service.preprocessor, strict)
        t1 = time.perf_counter()
        futures = service.batcher.submit([d[1] for d in decoded if not isinstance(d, Unreadable)])
    except NeverFits as exc:
        raise RequestError(413, f"{exc}; send at most {config.max_queue} images per request (--max-queue)",
                           images=len(uploads), max_queue=config.max_queue) from None
    except Overloaded as exc:
        raise RequestError(503, f"the service is busy ({exc}); retry shortly") from None
    finally:
        service.arriving(-len(uploads))
    got = iter(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
    scores = [d if isinstance(d, Unreadable) else next(got) for d in decoded]
    timing = {"decode_ms": 1000 * (t1 - t0), "model_ms": 1000 * (time.perf_counter() - t1)}
    return heads, uploads, scores, timing


async def score(request: Request, strict: bool = False):
    heads, uploads, scores, timing = await _scores(request, strict=strict)
    good = [s for s in scores if not isinstance(s, Unreadable)]
    per_head = [iter(heads.tier_fields(h, [s[h] for s in good])) for h in range(len(heads.scorers))]
    idents = heads.identities()
    results = []
    for u, s in zip(uploads, scores):
        if isinstance(s, Unreadable):
            results.append(s.entry())
            continue
        rows = [{**idents[h], **{k: v for k, v in s[h].items() if k != "members"}, **next(per_head[h])}
                for h in range(len(idents))]
        primary = {k: v for k, v in rows[0].items() if k not in idents[0]}
        results.append({"index": u.index, "image": u.name, **primary, "heads": rows})
    return {"model": idents[0], "results": results, "failed": len(scores) - len(good), "timing": timing}


async def compare(request: Request):
    heads, uploads, scores, timing = await _scores(request, keys=("a", "b"))
    if len(uploads) != 2:
        raise RequestError(400, f"compare takes exactly two images (a, b), got {len(uploads)}", images=len(uploads))
    out = []
    for h, (scorer, ident) in enumerate(zip(heads.scorers, heads.identities())):
        sa, sb = scores[0][h], scores[1][h]
        a, b = sa["score"], sb["score"]
        # P(a better) of an ensemble: the members' probabilities averaged, as scoring files does.
        p = (sum(scorer.calibration.prob_first_better(x, y) for x, y in zip(sa["members"], sb["members"]))
             / len(sa["members"]) if scorer.calibration is not None else None)
        spread = {f"{k}_{side}": v[k] for side, v in (("a", sa), ("b", sb)) for k in ("score_std", "typicality")
                  if k in v}
        out.append({**ident, "score_a": a, "score_b": b, "better": "a" if a > b else "b" if b > a else "tie",
                    "prob_a_better": None if p is None else float(p), **spread})
    lead = {k: v for k, v in out[0].items() if k in ("score_a", "score_b", "better", "prob_a_better")
            or k.startswith(("score_std_", "typicality_"))}
    return {"a": uploads[0].name, "b": uploads[1].name, **lead, "model": heads.identities()[0], "heads": out,
            "timing": timing}


async def explain(request: Request, overlay: bool = True, head: int = 0, strict: bool = False):
    service = _service(request)
    heads, config = service.ready(), service.config
    if not 0 <= head < len(heads.scorers):
        raise RequestError(400, f"head must be 0..{len(heads.scorers) - 1}, got {head}", field="head")
    uploads = await read_uploads(request, config.max_explain_images, config.max_image_bytes,
                                 images_flag="--max-explain-images")
    decoded = await run_in_threadpool(decode_all, uploads, service.preprocessor, strict)
    readable = [(u, d[0]) for u, d in zip(uploads, decoded) if not isinstance(d, Unreadable)]
    scorer = heads.scorers[head]

    def run():
        with service.model_lock:  # the backbone's hooks must not interleave with a scoring batch
            return scorer.explain_images([(u.name, img) for u, img in readable], steps=config.explain_steps)
    explained = iter(await run_in_threadpool(run))
    results = [d.entry() if isinstance(d, Unreadable) else _explained(u, next(explained), d[0], overlay)
               for u, d in zip(uploads, decoded)]
    return {"model": heads.identities()[head], "results": results, "failed": len(uploads) - len(readable)}


def _explained(upload, exp, img, overlay: bool) -> dict:
    row = {"index": upload.index, "image": upload.name, **exp.to_dict()}
    row.pop("path", None)  # the server's name for an upload means nothing to the client
    if overlay:
        row["overlay_png_base64"] = _png_base64(exp, img)
    return row


def _png_base64(exp, img) -> str:
    from mirip.scoring.heatmap import render_explanation

    buf = io.BytesIO()
    render_explanation(exp, img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


ROUTES = (("GET", "/health", health), ("GET", "/info", info), ("POST", "/score", score),
          ("POST", "/compare", compare), ("POST", "/explain", explain))
