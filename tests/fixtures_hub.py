"""A Hugging Face Hub on loopback that speaks the part of the Hub API push_to_hub uses (create a repository,
validate a card, pre-upload, commit), keeping what is committed: the test of our publishing without the
internet. `refuse` answers 401 to everything; `fail_commits` answers 500 to commits."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class LoopbackHub:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = []
        self.repos: list[dict] = []
        self.refuse = False
        self.fail_commits = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._reply(401 if hub.refuse else 404, {"error": "not here"})

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if hub.refuse:
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                if self.path.startswith("/api/validate-yaml"):
                    return self._reply(200, {"errors": [], "warnings": []})
                if self.path.startswith("/api/repos/create"):
                    request = json.loads(body)
                    hub.repos.append(request)
                    owner = request.get("organization") or "me"
                    return self._reply(200, {"url": f"{hub.url}/{owner}/{request['name']}", "name": request["name"]})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    if hub.fail_commits:
                        return self._reply(500, {"error": "internal error"})
                    lines = [json.loads(line) for line in body.splitlines()]
                    hub.commits.append(lines[0]["value"]["summary"])
                    for item in lines[1:]:
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    oid = f"{len(hub.commits):040x}"
                    return self._reply(200, {"commitUrl": f"{hub.url}/me/repo/commit/{oid}", "commitOid": oid})
                self._reply(404, {"error": "unknown route"})

        return Handler


@pytest.fixture
def loopback_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    hub = LoopbackHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    yield hub
    hub.server.shutdown()
