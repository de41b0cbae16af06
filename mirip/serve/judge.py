"""The judging endpoints beside the scoring ones: ``GET /judge`` (the page), its JSON calls, the drawings'
images by the ids the desk gave out, and ``GET /judgments.csv``.

A judge opens ``/judge?token=...`` once; the token then travels as an HttpOnly cookie and the address bar
loses it (a redirect). No path from a request is ever opened: an image is drawing number ``i`` of the
metadata, served only while it is in the judge's open pair.
"""

from __future__ import annotations

import html
import json
import logging
import re
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse

from starlette.concurrency import run_in_threadpool

from mirip.judging.desk import DeskError, JudgingDesk
from mirip.judging.store import export_csv_text
from mirip.serve.judge_page import PAGE

COOKIE = "mirip_judge"
MAX_BODY = 2048  # an answer is ~80 bytes of JSON
JUDGE_PATHS = ("/judge", "/judgments.csv")


_TOKEN_IN_QUERY = re.compile(r"(?<=[?&]token=)[^&\s]*")


class RedactTokens(logging.Filter):
    """Blanks ``token=...`` in the access log's request lines: a judge's token is their password, and
    ``/judge?token=...`` is how they open the page once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_QUERY.sub("***", a) if isinstance(a, str) else a for a in record.args)
        return True


def _token(request: Request) -> Optional[str]:
    return request.query_params.get("token") or request.cookies.get(COOKIE)


def _refuse(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


UNAUTHORISED = "missing or wrong judge token: open /judge?token=YOUR_TOKEN (from judges.csv) once"


async def _small_json(request: Request) -> dict:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise DeskError(413, f"the request body is over {MAX_BODY} bytes; a judgment is a few dozen")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise DeskError(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise DeskError(400, "the request body must be a JSON object")
    return data


def add_judging(app: FastAPI, desk: JudgingDesk) -> None:
    """Mount the judging routes on ``app`` (``create_app`` calls it when the service runs with --judge)."""

    def judge_or_none(request: Request) -> Optional[str]:
        return desk.judge_of(_token(request))

    async def page(request: Request):
        judge = judge_or_none(request)
        if judge is None:
            return HTMLResponse(f"<!doctype html><title>mirip judging</title><p>{html.escape(UNAUTHORISED)}</p>",
                                status_code=401)
        if "token" in request.query_params:
            response = RedirectResponse("/judge", status_code=303)
            response.set_cookie(COOKIE, request.query_params["token"], httponly=True, samesite="strict",
                                max_age=30 * 24 * 3600)
            return response
        return HTMLResponse(PAGE.replace("__JUDGE__", html.escape(judge)),
                            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"})

    def guarded(action):
        async def endpoint(request: Request):
            judge = judge_or_none(request)
            if judge is None:
                return _refuse(401, UNAUTHORISED)
            try:
                return await action(request, judge)
            except DeskError as exc:
                return _refuse(exc.status, str(exc))
        return endpoint

    async def next_pair(request: Request, judge: str):
        return JSONResponse(await run_in_threadpool(desk.next, judge))

    async def answer(request: Request, judge: str):
        data = await _small_json(request)
        return JSONResponse(await run_in_threadpool(desk.answer, judge, data.get("offer"), data.get("choice")))

    async def undo(request: Request, judge: str):
        await _small_json(request)
        return JSONResponse(await run_in_threadpool(desk.undo, judge))

    async def image(request: Request, judge: str):
        raw = request.path_params["index"]
        if not raw.isdigit() or int(raw) >= len(desk.book.names):
            raise DeskError(404, f"no drawing {raw[:20]!r}")
        return FileResponse(desk.image_path(judge, int(raw)), headers={"Cache-Control": "private, max-age=600"})

    async def export(request: Request, judge: str):
        return PlainTextResponse(export_csv_text(desk.store.all()), media_type="text/csv",
                                 headers={"Content-Disposition": 'attachment; filename="judgments.csv"'})

    app.add_api_route("/judge", page, methods=["GET"])
    app.add_api_route("/judge/next", guarded(next_pair), methods=["GET"])
    app.add_api_route("/judge/answer", guarded(answer), methods=["POST"])
    app.add_api_route("/judge/undo", guarded(undo), methods=["POST"])
    app.add_api_route("/judge/image/{index}", guarded(image), methods=["GET"])
    app.add_api_route("/judgments.csv", guarded(export), methods=["GET"])
