"""Stream a multipart upload straight into a folder on disk, under a size cap.

The body is parsed chunk by chunk as it arrives (python-multipart); file parts
are written to `<work_dir>/<field name>` and text fields are kept (they are
tiny).  Nothing is buffered whole, and the upload stops at the first byte past
the cap.  Only the expected fields are accepted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import IO, TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.protocol import APIError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_TEXT_FIELD_BYTES = 1024


@dataclasses.dataclass
class Upload:
    fields: dict[str, str]  # text fields
    files: dict[str, Path]  # file field name -> where its bytes were written


class _PartWriter:
    """python-multipart callbacks: route each part's bytes to a file or a text field."""

    def __init__(self, work_dir: Path, file_fields: frozenset[str], text_fields: frozenset[str]):
        self.work_dir, self.file_fields, self.text_fields = work_dir, file_fields, text_fields
        self.upload = Upload({}, {})
        self.header_name = b""
        self.headers: dict[bytes, bytes] = {}
        self.field = ""  # the form field of the part being read
        self.sink: IO[bytes] | None = None
        self.text = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.headers, self.header_name, self.text = {}, b"", bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name = data[start:end].lower()

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.headers[self.header_name] = self.headers.get(self.header_name, b"") + data[start:end]

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.field = params.get(b"name", b"").decode("utf-8", "replace")
        if self.field in self.file_fields and self.field not in self.upload.files:
            path = self.work_dir / self.field
            self.sink = open(path, "wb")  # noqa: SIM115  (closed in on_part_end or close)
            self.upload.files[self.field] = path
        elif self.field not in self.text_fields or self.field in self.upload.fields:
            raise APIError(400, f"unexpected or repeated form field {self.field!r}", param=self.field)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.sink is not None:
            self.sink.write(data[start:end])
            return
        self.text += data[start:end]
        if len(self.text) > MAX_TEXT_FIELD_BYTES:
            raise APIError(
                400, f"form field {self.field!r} is longer than {MAX_TEXT_FIELD_BYTES} bytes", param=self.field
            )

    def on_part_end(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        else:
            self.upload.fields[self.field] = self.text.decode("utf-8", "replace")

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise APIError(415, "POST /adapters takes multipart/form-data", code="unsupported_media_type")
    return params[b"boundary"]


def _check_declared_size(request: Request, cap: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large(cap)


def too_large(cap: int) -> APIError:
    return APIError(
        413, f"the upload is larger than the {cap} byte limit (D2LORA_MAX_UPLOAD_BYTES)", code="upload_too_large"
    )


async def receive_upload(
    request: Request, work_dir: Path, file_fields: frozenset[str], text_fields: frozenset[str], cap: int
) -> Upload:
    """Parse the body of `request` into `work_dir`; 413 past `cap` bytes, 400 if malformed."""
    _check_declared_size(request, cap)
    writer = _PartWriter(work_dir, file_fields, text_fields)
    parser = MultipartParser(_boundary(request), writer.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > cap:
                raise too_large(cap)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as err:
        raise APIError(400, f"malformed multipart body: {err}") from None
    except ClientDisconnect:
        raise APIError(400, "the client disconnected during the upload") from None
    finally:
        writer.close()
    return writer.upload
