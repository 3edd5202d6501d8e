"""``EngineError``: a failure of an engine call, shaped like an OpenAI API error.

The engine raises it from every public method; the HTTP app turns it into OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}`` with ``status`` as the HTTP status, and the
``local`` provider turns it into ``ProviderError`` (``RemoteNotFound`` for 404). Messages never
contain an API key.
"""

from __future__ import annotations

from typing import Any

from batchspec.errors import BatchspecError


class EngineError(BatchspecError):
    """An engine call was refused; ``status`` is the HTTP status the API answers with."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def envelope(self) -> dict[str, Any]:
        """OpenAI's error envelope for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def not_found(kind: str, object_id: str) -> EngineError:
    """The 404 OpenAI answers for an unknown file or batch id."""
    return EngineError(404, f"No such {kind}: '{object_id}'.", param="id", code=None)


def file_too_large(limit: int) -> EngineError:
    """The 413 OpenAI answers for an upload over the size cap."""
    return EngineError(
        413, f"File is too large: the limit is {limit} bytes.", param="file", code="file_too_large"
    )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> EngineError:
    return EngineError(400, message, param=param, code=code)
