"""Test helper: a small OpenAI Files + Batches stand-in on 127.0.0.1 that can misbehave.

``HostileOpenAI()`` serves ``/v1/files`` (upload, get, content), ``/v1/batches`` (create,
get, list with ``after`` and ``limit``, cancel) from memory. A batch is created ``completed``
at once, its output file holding one answer per input line (``answer to <custom_id>``),
unless a test says otherwise.
Every route's answer passes through ``hooks`` first: ``hooks["GET /v1/batches/{id}"]`` (the
route with ids replaced by ``{id}``) is called with ``(server, seen, answer)`` and returns the
answer to send (``Reply``: status, JSON or raw body, headers), so a test makes the provider
lie in one place: a status going backwards, another batch's file, a body cut short. ``seen``
records every request (method, path, headers). The server is stopped by ``stop()``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from servers import QuietHTTPServer


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, payload: Any, status: int = 200) -> Reply:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


Hook = Callable[["HostileOpenAI", SeenRequest, Reply], Reply]


def answer_line(custom_id: str, text: str | None = None) -> dict[str, Any]:
    """An output line answering ``custom_id`` (HTTP 200, a chat completion)."""
    return {
        "id": f"batch_req_{custom_id}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": f"req_{custom_id}",
            "body": {
                "object": "chat.completion",
                "model": "test-model",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text or f"answer to {custom_id}",
                        },
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        },
        "error": None,
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


class HostileOpenAI:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.outputs: dict[str, str] = {}  # batch id: its output file's id
        self.hooks: dict[str, Hook] = {}
        self.seen: list[SeenRequest] = []
        #: the status a batch is created in (``completed``: its output file is ready at once)
        self.initial_status = "completed"
        self.lock = threading.Lock()
        self._httpd = QuietHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def v1(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def routes(self) -> list[str]:
        return [f"{s.method} {_route(s.path)}" for s in self.seen]

    def creates(self) -> int:
        return self.routes().count("POST /v1/batches")

    # -- the honest server ----------------------------------------------------------------

    def add_file(self, content: bytes, purpose: str = "batch_output") -> str:
        with self.lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = content
        return file_id

    def file_object(self, file_id: str, purpose: str = "batch") -> dict[str, Any]:
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(self.files[file_id]),
            "created_at": 1_700_000_000,
            "filename": "input.jsonl",
            "purpose": purpose,
            "status": "processed",
        }

    def finish_all(self) -> None:
        """End every batch ``completed``, its output file named."""
        with self.lock:
            for batch_id, batch in self.batches.items():
                batch.update(status="completed", output_file_id=self.outputs[batch_id])

    def create(self, payload: dict[str, Any]) -> dict[str, Any]:
        import time

        lines = [
            json.loads(x) for x in self.files[payload["input_file_id"]].splitlines() if x.strip()
        ]
        output = self.add_file(
            jsonl(
                [
                    answer_line(
                        line["custom_id"],
                        "answer to " + json.dumps(line["body"].get("messages", "")),
                    )
                    for line in lines
                ]
            )
        )
        with self.lock:
            batch_id = f"batch_{len(self.batches) + 1}"
            batch = {
                "id": batch_id,
                "object": "batch",
                "endpoint": payload["endpoint"],
                "input_file_id": payload["input_file_id"],
                "completion_window": payload["completion_window"],
                "status": self.initial_status,
                "output_file_id": output if self.initial_status == "completed" else None,
                "error_file_id": None,
                "created_at": int(time.time()),
                "request_counts": {"total": len(lines), "completed": len(lines), "failed": 0},
                "metadata": payload.get("metadata") or {},
            }
            self.batches[batch_id] = batch
            self.outputs[batch_id] = output
            self.order.append(batch_id)
        return batch

    def listing(self, query: dict[str, list[str]]) -> Reply:
        """A page of batches, newest first, after the ``after`` cursor (an id it does not
        know: 400, as ``batchspec serve`` answers), ``limit`` of them (20 unless said)."""
        with self.lock:
            newest_first = list(reversed(self.order))
        after = (query.get("after") or [""])[0]
        limit = int((query.get("limit") or ["20"])[0])
        if after and after not in newest_first:
            message = f"The cursor after='{after}' names no known object."
            return Reply.of({"error": {"message": message, "type": "invalid_request_error"}}, 400)
        start = newest_first.index(after) + 1 if after else 0
        rows = [self.batches[b] for b in newest_first[start : start + limit]]
        return Reply.of(
            {
                "object": "list",
                "data": rows,
                "has_more": start + limit < len(newest_first),
                "first_id": rows[0]["id"] if rows else None,
                "last_id": rows[-1]["id"] if rows else None,
            }
        )

    def answer(self, seen: SeenRequest, body: bytes) -> Reply:
        route = _route(seen.path)
        key = f"{seen.method} {route}"
        parts = urlsplit(seen.path).path.split("/")
        if key == "POST /v1/files":
            content = _multipart_file(seen.headers, body)
            reply = Reply.of(self.file_object(self.add_file(content, "batch")))
        elif key == "GET /v1/files/{id}":
            fid = parts[3]
            reply = Reply.of(self.file_object(fid)) if fid in self.files else _not_found()
        elif key == "GET /v1/files/{id}/content":
            fid = parts[3]
            reply = Reply(200, self.files[fid]) if fid in self.files else _not_found()
        elif key == "POST /v1/batches":
            reply = Reply.of(self.create(json.loads(body)))
        elif key == "GET /v1/batches":
            reply = self.listing(parse_qs(urlsplit(seen.path).query))
        elif key == "GET /v1/batches/{id}":
            reply = Reply.of(self.batches[parts[3]]) if parts[3] in self.batches else _not_found()
        elif key == "POST /v1/batches/{id}/cancel":
            reply = Reply.of(self.batches[parts[3]])
        else:
            reply = _not_found()
        hook = self.hooks.get(key)
        return hook(self, seen, reply) if hook else reply


def _not_found() -> Reply:
    return Reply.of({"error": {"message": "not found", "type": "invalid_request_error"}}, 404)


def _route(path: str) -> str:
    parts = urlsplit(path).path.split("/")
    if len(parts) > 3 and parts[2] in ("files", "batches"):
        parts[3] = "{id}"
    return "/".join(parts)


def _multipart_file(headers: dict[str, str], body: bytes) -> bytes:
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {headers['content-type']}\r\n\r\n".encode() + body
    )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True)
    raise ValueError("no file part")


def _handler(server: HostileOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def _serve(self) -> None:
            body = self._body()
            seen = SeenRequest(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
            )
            with server.lock:
                server.seen.append(seen)
            reply = server.answer(seen, body)
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if "Content-Length" not in reply.headers:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)

        do_GET = do_POST = do_DELETE = _serve  # noqa: N815

    return Handler
