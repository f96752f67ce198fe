"""An HTTP server that imitates the Kubernetes API for Istio VirtualServices.

Nothing real can run a Kubernetes API server here, so this speaks its wire protocol for the calls
the IstioWeightOperator makes: GET and PATCH (RFC 6902 JSON Patch) of
``/apis/networking.istio.io/v1/namespaces/{ns}/virtualservices/{name}``, with the API's answers:
``Status`` objects, 404 NotFound, 415 for an unsupported patch type, 422 Invalid when a ``test``
operation fails (as kube-apiserver does), a new resourceVersion on every write, and optionally a
409 Conflict for the next N writes (another writer won the race at the storage layer).
"""
from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonpatch

PATH = re.compile(r"^/apis/networking\.istio\.io/v1/namespaces/([^/]+)/virtualservices/([^/?]+)$")


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class FakeKubernetesAPI:
    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.conflicts_to_inject = 0
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, content type
        self._version = 100
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def start(self) -> "FakeKubernetesAPI":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()

    def put(self, obj: dict) -> None:
        with self._lock:
            self._version += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._version)
            self.objects[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def get(self, namespace: str, name: str) -> dict:
        return copy.deepcopy(self.objects[(namespace, name)])

    def _patch(self, key, content_type: str, body: bytes) -> tuple[int, dict]:
        if content_type != "application/json-patch+json":
            return 415, status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                             f"accepted media types include: application/json-patch+json")
        with self._lock:
            if key not in self.objects:
                return 404, status(404, "NotFound", f'virtualservices.networking.istio.io "{key[1]}" not found')
            if self.conflicts_to_inject:
                self.conflicts_to_inject -= 1
                self._version += 1  # someone else wrote it meanwhile
                self.objects[key]["metadata"]["resourceVersion"] = str(self._version)
                return 409, status(409, "Conflict", f'Operation cannot be fulfilled on virtualservices.networking.istio.io '
                                                    f'"{key[1]}": the object has been modified; please apply your '
                                                    f'changes to the latest version and try again')
            try:
                patched = jsonpatch.apply_patch(self.objects[key], json.loads(body))
            except jsonpatch.JsonPatchTestFailed as exc:
                return 422, status(422, "Invalid", f"the server rejected our request due to an error in our "
                                                   f"request: {exc}")
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return 422, status(422, "Invalid", str(exc))
            self._version += 1
            patched["metadata"]["resourceVersion"] = str(self._version)
            self.objects[key] = patched
            return 200, copy.deepcopy(patched)

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _key(self):
                match = PATH.match(self.path.split("?")[0])
                return (match.group(1), match.group(2)) if match else None

            def do_GET(self):
                api.requests.append(("GET", self.path, None))
                key = self._key()
                if key is None or key not in api.objects:
                    return self._reply(404, status(404, "NotFound", "the server could not find the requested resource"
                                                   if key is None else
                                                   f'virtualservices.networking.istio.io "{key[1]}" not found'))
                self._reply(200, api.get(*key))

            def do_PATCH(self):
                content_type = self.headers.get("Content-Type", "").split(";")[0]
                api.requests.append(("PATCH", self.path, content_type))
                key = self._key()
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if key is None:
                    return self._reply(404, status(404, "NotFound", "the server could not find the requested resource"))
                self._reply(*api._patch(key, content_type, body))

        return Handler
