"""Streaming ``multipart/form-data`` uploads straight into a content-addressed blob.

Starlette's ``request.form()`` spools files without a size cap; this parser feeds the request
body to python-multipart and writes the one file part directly into a ``BlobWriter``, which
hashes it on the way and raises ``EngineError(413)`` the moment it passes the cap. Memory
stays one network chunk plus the small text fields (each capped at ``MAX_FIELD_BYTES``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

from batchspec.engine.errors import bad_request
from batchspec.storage.blobstore import BlobWriter

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32


@dataclass
class Upload:
    """What a multipart body held: text fields, and the file part written to a blob."""

    fields: dict[str, str] = field(default_factory=dict)
    file: BlobWriter | None = None
    filename: str | None = None
    file_field: str | None = None

    def discard(self) -> None:
        if self.file is not None:
            self.file.discard()


class _UploadParser:
    def __init__(self, open_writer: Callable[[], BlobWriter]) -> None:
        self.upload = Upload()
        self._open_writer = open_writer
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._data = bytearray()
        self._is_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise bad_request("Every multipart part needs a Content-Disposition name.")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self.upload.file is not None:
                raise bad_request("Send exactly one file per upload.", param=self._name)
            self._is_file = True
            self.upload.filename = options[b"filename"].decode("utf-8", "replace")
            self.upload.file_field = self._name
            self.upload.file = self._open_writer()
        elif len(self.upload.fields) >= MAX_FIELDS:
            raise bad_request(f"Too many form fields (at most {MAX_FIELDS}).")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            assert self.upload.file is not None
            self.upload.file.write(data[start:end])
            return
        if len(self._data) + (end - start) > MAX_FIELD_BYTES:
            raise bad_request(f"Form field {self._name!r} is too large.", param=self._name)
        self._data.extend(data[start:end])

    def on_part_end(self) -> None:
        if not self._is_file:
            self.upload.fields[self._name] = self._data.decode("utf-8", "replace")


async def read_upload(
    content_type: str, body: AsyncIterator[bytes], open_writer: Callable[[], BlobWriter]
) -> Upload:
    """Parse a multipart body; the caller owns (commits or discards) ``Upload.file``."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise bad_request("Upload files as multipart/form-data with a 'file' and a 'purpose'.")
    handler = _UploadParser(open_writer)
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": handler.on_part_begin,
            "on_part_data": handler.on_part_data,
            "on_part_end": handler.on_part_end,
            "on_header_field": handler.on_header_field,
            "on_header_value": handler.on_header_value,
            "on_header_end": handler.on_header_end,
            "on_headers_finished": handler.on_headers_finished,
        },
    )
    try:
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except BaseException as err:
        handler.upload.discard()
        if isinstance(err, Exception) and not hasattr(err, "status"):
            raise bad_request(f"The multipart body could not be parsed: {err}") from err
        raise
    return handler.upload
