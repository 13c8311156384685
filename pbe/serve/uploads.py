"""Reading ``POST /api/paint``'s body without trusting it: the size counted as it arrives, kept in memory, pictures
checked from their header before any pixel is decoded.

Every refusal is a ``Refused(status, detail)``: 413 too large, 415 not a picture of an accepted type (the field and
the type found named), 422 a corrupt picture, one with too many pixels (a decompression bomb: a few bytes that claim
30000x30000) or a form that cannot be read.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import PIL.Image
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .. import images

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # PIL's names; GIF: its first frame
PICTURE_FIELDS = ("image", "mask", "example")
_CLOSE = {"Connection": "close"}  # a refused body is not drained: the connection closes instead


class Refused(Exception):
    """A request refused with HTTP ``status`` and a one-line ``detail``."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def check_declared_size(headers: Headers, limit: int) -> None:
    """413 at once when the Content-Length announces more than ``limit`` bytes (nothing read yet)."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"upload too large: {int(declared)} bytes, the limit is {limit} bytes (max_upload_bytes)",
                      headers=_CLOSE)


async def _counted(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """``stream`` as it arrives, refused with 413 as soon as it passes ``limit`` bytes (chunked uploads announce no
    size)."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise Refused(413, f"upload too large: more than {limit} bytes (max_upload_bytes)", headers=_CLOSE)
        yield chunk


async def read_form(headers: Headers, stream: AsyncIterator[bytes], *, limit: int) -> FormData:
    """The multipart form, read into memory (never spooled to a file), at most ``limit`` bytes."""
    content_type = headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise Refused(415, f"expected a multipart/form-data body, got {content_type or 'no content type'!r}")
    parser = MultiPartParser(headers, _counted(stream, limit), max_files=len(PICTURE_FIELDS), max_fields=64,
                             max_part_size=64 * 1024)
    # Parts beyond spool_max_size would roll over to (unnamed) temporary files: the body is bounded, keep it in RAM.
    parser.spool_max_size = limit + 1
    try:
        return await parser.parse()
    except MultiPartException as err:
        raise Refused(422, f"cannot read the form: {err.message}") from None


def _what_it_is(data: bytes, content_type: str | None) -> str:
    """A short name for data that PIL does not take as an accepted picture."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as opened:
            return f"a {opened.format} picture"
    except Exception:
        pass
    if data.startswith(b"%PDF"):
        return "a PDF document"
    try:
        data[:4096].decode("utf-8")
        return "text" if data else "an empty file"
    except UnicodeDecodeError:
        return f"unknown data (sent as {content_type or 'no content type'})"


async def read_picture(form: FormData, name: str, *, max_pixels: int) -> PIL.Image.Image:
    """The picture in the form's file field ``name``, decoded and turned upright (EXIF), as ``pbe paint`` reads a file.

    Its size is read from the header and refused over ``max_pixels`` before any pixel is decoded; the decoding runs
    on a thread of its own, so that a large picture does not hold up the server's other requests.
    """
    upload = form.get(name)
    if not isinstance(upload, UploadFile):
        raise Refused(422, f"{name}: expected a picture file in the form field {name!r}, got "
                           f"{'nothing' if upload is None else 'a text field'}")
    data = await upload.read()
    return await asyncio.to_thread(_decode, data, name, upload.content_type, max_pixels=max_pixels)


def _decode(data: bytes, name: str, content_type: str | None, *, max_pixels: int) -> PIL.Image.Image:
    accepted = ", ".join(ACCEPTED_FORMATS)
    try:  # reads the header only; PIL's DecompressionBombWarning may show: max_pixels decides, below
        opened = PIL.Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except PIL.Image.DecompressionBombError as err:  # PIL's own ceiling, far above any sane max_pixels
        raise Refused(422, f"{name}: too many pixels ({err}); the limit is {max_pixels} (max_pixels)") from None
    except PIL.UnidentifiedImageError:
        raise Refused(415, f"{name}: expected a picture ({accepted}), got {_what_it_is(data, content_type)}"
                      ) from None
    except Exception as err:  # a header PIL recognises but cannot parse
        raise Refused(422, f"{name}: a corrupt picture ({_one_line(err)})") from None
    with opened:
        width, height = opened.size
        if width * height > max_pixels:
            raise Refused(422, f"{name}: {width}x{height} pixels is {width * height} pixels, more than the limit of "
                               f"{max_pixels} (max_pixels)")
        try:
            opened.load()  # the first frame of a GIF; a truncated or damaged file fails here
        except Exception as err:
            raise Refused(422, f"{name}: a corrupt {opened.format} picture ({_one_line(err)})") from None
        return images.load_image(opened)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
