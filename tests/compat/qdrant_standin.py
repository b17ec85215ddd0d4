"""A Qdrant-shaped REST server for the tests of llmservice's `QDRANT_URL` path.

No Qdrant server can run on the machines these tests run on (no container
runtime; building one from source takes far longer than the suite). This
serves the REST routes llmservice calls, and each request body is checked by
qdrant-client's own pydantic models of Qdrant's REST schema (unknown fields
refused, as the server's schema does) and carried out by qdrant-client's
local mode, Qdrant's reference implementation in Python: payload filters,
sparse vectors with the IDF modifier, prefetch with reciprocal rank fusion,
MaxSim multivectors, collection metadata. It persists under `--path`, so a
restarted llmservice finds its collections; answers use Qdrant's envelope
(`{"result": ..., "status": "ok", "time": ...}`, errors as
`{"status": {"error": ...}}`), and with `--api-key` every request must carry
it in the `api-key` header, as Qdrant checks it.

    python qdrant_standin.py --path DIR --port-file FILE [--api-key KEY] [--version V]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pydantic
from qdrant_client import QdrantClient, models

ROUTE = re.compile(
    r"^/collections(?:/(?P<name>[^/]+)(?P<rest>/index|/points(?:/(?P<op>delete|count|scroll|query))?)?)?$"
)


# Local mode keeps no payload indexes and says so on each; the requests are still checked.
warnings.filterwarnings("ignore", message="Payload indexes have no effect")


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Store:
    """The local-mode client behind one lock (it is not thread-safe)."""

    def __init__(self, path: Path):
        self.client = QdrantClient(path=str(path))
        self.lock = threading.Lock()

    def collection(self, name: str) -> None:
        if not self.client.collection_exists(name):
            raise Refused(404, f"Not found: Collection `{name}` doesn't exist!")

    def handle(self, method: str, name: str | None, rest: str | None, op: str | None, body):
        with self.lock:
            if name is None:
                if method != "GET":
                    raise Refused(405, "method not allowed")
                names = [c.name for c in self.client.get_collections().collections]
                return {"collections": [{"name": n} for n in names]}
            if rest is None:
                return self.on_collection(method, name, body)
            self.collection(name)
            if rest == "/index":
                request = models.CreateFieldIndex.model_validate(body)
                self.client.create_payload_index(name, request.field_name, request.field_schema)
                return {"operation_id": 0, "status": "completed"}
            return self.on_points(method, name, op, body)

    def on_collection(self, method: str, name: str, body):
        if method == "GET":
            self.collection(name)
            return self.client.get_collection(name).model_dump(mode="json")
        if method == "PUT":
            request = models.CreateCollection.model_validate(body)
            if self.client.collection_exists(name):
                raise Refused(409, f"Wrong input: Collection `{name}` already exists!")
            self.client.create_collection(
                name,
                vectors_config=request.vectors,
                sparse_vectors_config=request.sparse_vectors,
                metadata=request.metadata,
            )
            return True
        if method == "DELETE":
            return self.client.delete_collection(name)
        raise Refused(405, "method not allowed")

    def on_points(self, method: str, name: str, op: str | None, body):
        if op is None and method == "PUT":
            request = models.PointsList.model_validate(body)
            self.client.upsert(name, points=request.points)
            return {"operation_id": 0, "status": "completed"}
        if method != "POST":
            raise Refused(405, "method not allowed")
        if op == "delete":
            selector = pydantic.TypeAdapter(models.PointsSelector).validate_python(body)
            self.client.delete(name, points_selector=selector)
            return {"operation_id": 0, "status": "completed"}
        if op == "count":
            request = models.CountRequest.model_validate(body)
            return {"count": self.client.count(name, count_filter=request.filter, exact=True).count}
        if op == "scroll":
            request = models.ScrollRequest.model_validate(body)
            points, offset = self.client.scroll(
                name,
                scroll_filter=request.filter,
                limit=request.limit or 10,
                offset=request.offset,
                with_payload=request.with_payload if request.with_payload is not None else True,
                with_vectors=request.with_vector or False,
            )
            return {"points": [p.model_dump(mode="json") for p in points],
                    "next_page_offset": str(offset) if offset is not None else None}
        if op == "query":
            request = models.QueryRequest.model_validate(body)
            found = self.client.query_points(
                name,
                query=request.query,
                using=request.using,
                prefetch=request.prefetch,
                query_filter=request.filter,
                limit=request.limit or 10,
                with_payload=request.with_payload if request.with_payload is not None else False,
                with_vectors=request.with_vector or False,
            )
            return {"points": [p.model_dump(mode="json") for p in found.points]}
        raise Refused(404, "no such route")


def serve(store: Store, api_key: str | None, version: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

        def answer(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def run(self) -> None:
            started = time.monotonic()
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                if api_key is not None and self.headers.get("api-key") != api_key:
                    raise Refused(401, "Invalid api-key")
                if urlsplit(self.path).path == "/" and self.command == "GET":
                    # Qdrant's banner, without the envelope.
                    self.answer(200, {"title": "qdrant - vector search engine", "version": version})
                    return
                match = ROUTE.match(urlsplit(self.path).path)
                if match is None:
                    raise Refused(404, "no such route")
                body = json.loads(raw) if raw else None
                result = store.handle(self.command, match["name"], match["rest"], match["op"], body)
                self.answer(200, {"result": result, "status": "ok", "time": time.monotonic() - started})
            except Refused as refused:
                self.answer(refused.status, {"status": {"error": str(refused)}, "time": 0.0})
            except (pydantic.ValidationError, json.JSONDecodeError) as error:
                self.answer(400, {"status": {"error": f"Format error in JSON body: {error}"}, "time": 0.0})
            except (ValueError, KeyError, TypeError) as error:
                self.answer(400, {"status": {"error": f"Bad request: {error}"}, "time": 0.0})

        do_GET = do_PUT = do_POST = do_DELETE = run

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--api-key")
    # The REST API qdrant-client's models describe (its own version), unless
    # a test wants an older server.
    parser.add_argument("--version", default=importlib.metadata.version("qdrant-client"))
    args = parser.parse_args()
    # Gone with the test process that started it, even when that one crashes.
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    handler = serve(Store(args.path), args.api_key, args.version)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    args.port_file.write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
