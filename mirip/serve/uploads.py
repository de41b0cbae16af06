"""Images out of a request: multipart files or base64 JSON, bounded, decoded in memory, errors that say where.

Nothing here touches the server's disk by name: a request carries bytes, never paths. Every limit is
checked before decoding (bytes per image, images per request); decoding itself enforces the pixel limit
(a decompression bomb is refused from its header) and reports an undecodable file by its name and index.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, List, Sequence

from starlette.exceptions import HTTPException

from mirip.ml.preprocessing import ImageReadError


class RequestError(Exception):
    """A request the service refuses: HTTP ``status``, a message saying what to change, and where."""

    def __init__(self, status: int, message: str, **where: Any):
        super().__init__(message)
        self.status, self.message, self.where = int(status), message, where

    def body(self) -> dict:
        return {"error": self.message, **self.where}


@dataclass
class Upload:
    index: int
    name: str
    data: bytes


def _b64(value: Any, index: int) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f"image {index} is not a base64 string", image_index=index)
    if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"image {index} is not valid base64", image_index=index) from None


def from_json(payload: Any, keys: Sequence[str] = ("images",)) -> List[Upload]:
    """``{"images": [b64 | {"name": ..., "data": b64}, ...]}`` (or the named ``keys``, e.g. ``a``, ``b``)."""
    if not isinstance(payload, dict):
        raise RequestError(400, 'the JSON body must be an object such as {"images": ["<base64>", ...]}')
    items: List[Any] = []
    if "images" in payload:
        if not isinstance(payload["images"], list):
            raise RequestError(400, '"images" must be a list of base64 strings or {"name", "data"} objects',
                               field="images")
        items = list(payload["images"])
    else:
        items = [payload[k] for k in keys if k in payload]
    uploads = []
    for i, item in enumerate(items):
        name = f"image{i}"
        if isinstance(item, dict):
            name = str(item.get("name") or name)
            item = item.get("data")
        uploads.append(Upload(i, name, _b64(item, i)))
    return uploads


async def read_uploads(request, max_images: int, max_image_bytes: int, keys: Sequence[str] = ("images",),
                       images_flag: str = "--max-images") -> List[Upload]:
    """The request's images, in order, within the limits; raises ``RequestError`` otherwise."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await _form(request, max_images, images_flag)
        try:
            parts = [(f, v) for f, v in form.multi_items() if hasattr(v, "read")]  # the UploadFiles
            if keys != ("images",) and all(any(f == k for f, _ in parts) for k in keys):
                parts = [next(p for p in parts if p[0] == k) for k in keys] + [p for p in parts if p[0] not in keys]
            uploads = [Upload(i, v.filename or f, await v.read(max_image_bytes + 1))
                       for i, (f, v) in enumerate(parts)]
        finally:
            await form.close()  # the spooled temporary files go at once, not when the request object does
    elif kind == "application/json":
        try:
            payload = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the body is not valid JSON ({exc})") from None
        except RecursionError:  # the decoder recurses per level: '[' * 50000 is a few KB of body
            raise RequestError(400, 'the JSON body is nested too deeply to read; send an object such as '
                                    '{"images": ["<base64>", ...]}') from None
        uploads = from_json(payload, keys)
    else:
        raise RequestError(415, f"send the images as multipart/form-data files or as JSON with base64 data, "
                                f"not {kind or 'no content type'}", content_type=kind or None)
    check_limits(uploads, max_images, max_image_bytes, images_flag)
    return uploads


async def _form(request, max_images: int, images_flag: str):
    """The multipart form, parsed with at most ``max_images`` files: a longer one is refused while it is
    parsed, with this service's limit (Starlette's own refusal names its parser setting, not the flag)."""
    try:
        return await request.form(max_files=max_images, max_fields=4 * max_images + 16)
    except HTTPException as exc:
        if exc.status_code != 400:  # the body limit's 413, raised while the form streams in
            raise
        if "number of files" in str(exc.detail):
            raise too_many(f"more than {max_images}", max_images, images_flag) from None
        raise RequestError(400, f"the multipart form cannot be read: {exc.detail}") from None


def too_many(count: str, max_images: int, images_flag: str, **where: Any) -> RequestError:
    return RequestError(413, f"{count} images in one request; this service takes at most {max_images} "
                             f"(split the request, or start it with a larger {images_flag})",
                        max_images=max_images, **where)


def check_limits(uploads: Sequence[Upload], max_images: int, max_image_bytes: int,
                 images_flag: str = "--max-images") -> None:
    if not uploads:
        raise RequestError(400, "the request holds no image: send files in a multipart form, or JSON "
                                '{"images": ["<base64>"]}')
    if len(uploads) > max_images:
        raise too_many(str(len(uploads)), max_images, images_flag, images=len(uploads))
    for u in uploads:
        if len(u.data) > max_image_bytes:
            raise RequestError(413, f"image {u.index} ({u.name}) is over the {max_image_bytes}-byte upload limit "
                                    "(start the service with a larger --max-image-mb to accept it)",
                               image_index=u.index, image=u.name, max_image_bytes=max_image_bytes)


@dataclass
class Unreadable:
    """An upload that cannot be decoded, in the place of its image in a lenient request's results."""
    index: int
    name: str
    reason: str

    def entry(self) -> dict:
        return {"index": self.index, "image": self.name, "reason": self.reason,
                "error": f"image {self.index} ({self.name}) cannot be read: {self.reason}"}


def _decode(u: Upload, preprocessor):
    try:
        img = preprocessor.load_bytes(u.data, u.name)
        return img, preprocessor(img)
    except ImageReadError as exc:
        return Unreadable(u.index, u.name, exc.reason)
    except (OSError, ValueError, MemoryError) as exc:
        return Unreadable(u.index, u.name, f"{exc.__class__.__name__}: {exc}")


def decode_all(uploads: Sequence[Upload], preprocessor, strict: bool = True) -> list:
    """Per upload, (PIL image, tensor); with ``strict`` false an ``Unreadable`` in the place of an image that
    cannot be decoded. ``RequestError`` 422 names every undecodable image when strict, or when none is readable
    (a request with nothing to answer)."""
    out = [_decode(u, preprocessor) for u in uploads]
    bad = [d for d in out if isinstance(d, Unreadable)]
    if bad and (strict or len(bad) == len(out)):
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RequestError(422, f"{bad[0].entry()['error']}{more}",
                           bad_images=[{"image_index": b.index, "image": b.name, "reason": b.reason} for b in bad])
    return out
