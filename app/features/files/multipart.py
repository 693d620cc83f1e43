"""Streaming multipart uploads: the body goes chunk by chunk to a staging file while it is
hashed and counted; it is never held in memory, and an oversized upload is refused (413) as
soon as it crosses the limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType

MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file part
MAX_FIELD_BYTES = 64 * 1024


@dataclass
class Upload:
    path: Path  # inside its own temporary directory (`workdir`)
    workdir: Path
    filename: str
    sha256: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def clean_filename(raw: str) -> str:
    # Control characters (NUL above all: Postgres refuses it in text) never reach the database.
    raw = "".join(c for c in raw if ord(c) >= 32 and ord(c) != 127)
    name = PurePosixPath(raw.replace("\\", "/")).name.strip()
    return name[-255:] if name else "upload"


async def _chunks(request: Request, idle_s: float, total_s: float):  # type: ignore[no-untyped-def]
    """The request body, cut off (408) when the client stalls for `idle_s` or the whole body
    takes longer than `total_s` (slowloris); 0 disables either bound."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_s if total_s > 0 else None
    stream = request.stream().__aiter__()
    while True:
        wait = idle_s if idle_s > 0 else None
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                raise RequestTimeout(f"the upload took longer than {total_s:.0f} s; it was cut off")
            wait = left if wait is None else min(wait, left)
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=wait)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(
                f"the client sent nothing for {idle_s:.0f} s; the upload was cut off"
                if deadline is None or loop.time() < deadline
                else f"the upload took longer than {total_s:.0f} s; it was cut off"
            ) from None
        yield chunk


class _Receiver:
    """python-multipart callbacks writing the `file` part to disk."""

    def __init__(
        self, workdir: Path, suffix_for: Callable[[str], str], max_bytes: int, file_field: str
    ):
        self.workdir = workdir
        self.suffix_for = suffix_for
        self.max_bytes = max_bytes
        self.file_field = file_field
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.part_name: str | None = None
        self.part_filename: str | None = None
        self.field_buf = bytearray()
        self.fh: BinaryIO | None = None
        self.hasher = hashlib.sha256()
        self.size = 0
        self.path: Path | None = None
        self.filename: str | None = None
        self.fields: dict[str, str] = {}

    # header callbacks
    def on_part_begin(self) -> None:
        self.headers = {}
        self.part_name = self.part_filename = None
        self.field_buf = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]
        if len(self.header_field) > MAX_FIELD_BYTES:
            raise BadRequest("a multipart part header is too long")

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]
        if len(self.header_value) > MAX_FIELD_BYTES:
            raise BadRequest("a multipart part header is too long")

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field = b""
        self.header_value = b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.part_name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        self.part_filename = filename.decode("utf-8", "replace") if filename is not None else None
        if self.part_name == self.file_field:
            if self.fh is not None:
                raise BadRequest(f"send exactly one '{self.file_field}' part")
            self.filename = clean_filename(self.part_filename or "upload")
            suffix = self.suffix_for(self.filename)
            self.path = self.workdir / f"upload{suffix}"
            self.fh = open(self.path, "wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.part_name == self.file_field and self.fh is not None:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"the upload is larger than the {self.max_bytes} byte limit")
            self.hasher.update(chunk)
            self.fh.write(chunk)
        else:
            self.field_buf += chunk
            if len(self.field_buf) > MAX_FIELD_BYTES:
                raise BadRequest(f"form field {self.part_name!r} is too long")

    def on_part_end(self) -> None:
        if self.part_name == self.file_field and self.fh is not None:
            self.fh.close()
        elif self.part_name:
            self.fields[self.part_name] = self.field_buf.decode("utf-8", "replace")


async def receive_upload(
    request: Request,
    staging_dir: Path,
    max_bytes: int,
    suffix_for: Callable[[str], str] = lambda name: "",
    file_field: str = "file",
    idle_timeout_s: float = 30.0,
    max_duration_s: float = 3600.0,
) -> Upload:
    """Stream the multipart body's `file` part into a fresh directory under `staging_dir`."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise UnsupportedMediaType(
            f"send the file as multipart/form-data with a '{file_field}' part "
            f"(curl -F {file_field}=@path ...), not {ctype.decode() or 'no content type'}"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("the multipart Content-Type has no boundary")
    if len(boundary) > 70 or not boundary.isascii():
        # RFC 2046: 1 to 70 characters. Checked before any staging directory exists.
        raise BadRequest(
            f"the multipart boundary is {len(boundary)} bytes long; RFC 2046 allows 1 to 70 ASCII characters"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(
            f"the upload is {int(declared)} bytes, over the {max_bytes} byte limit",
            headers={"Connection": "close"},
        )
    staging_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="up-", dir=staging_dir))
    receiver = _Receiver(workdir, suffix_for, max_bytes, file_field)
    try:
        parser = _parser(boundary, receiver)
    except Exception as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise BadRequest(f"malformed multipart Content-Type: {exc}") from None
    try:
        async for chunk in _chunks(request, idle_timeout_s, max_duration_s):
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except (PayloadTooLarge, BadRequest, UnsupportedMediaType, RequestTimeout) as exc:
        if receiver.fh is not None:
            receiver.fh.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(exc, (PayloadTooLarge, RequestTimeout)):
            exc.headers["Connection"] = "close"
        raise
    except BaseException as exc:
        if receiver.fh is not None:
            receiver.fh.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(exc, ClientDisconnect):
            raise BadRequest("the client disconnected before the upload finished") from None
        if isinstance(exc, Exception):  # the multipart parser's own errors
            raise BadRequest(f"malformed multipart body: {exc}") from None
        raise  # cancellation: the staging directory is gone already
    if receiver.fh is not None and not receiver.fh.closed:
        receiver.fh.close()
    if receiver.path is None:
        shutil.rmtree(workdir, ignore_errors=True)
        raise BadRequest(f"the multipart body has no '{file_field}' part with the file")
    if receiver.size == 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise BadRequest("the uploaded file is empty")
    return Upload(
        path=receiver.path,
        workdir=workdir,
        filename=receiver.filename or "upload",
        sha256=receiver.hasher.hexdigest(),
        size=receiver.size,
        fields=receiver.fields,
    )


def _parser(boundary: bytes, receiver: _Receiver) -> MultipartParser:
    return MultipartParser(
        boundary,
        {
            "on_part_begin": receiver.on_part_begin,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
        },
    )
