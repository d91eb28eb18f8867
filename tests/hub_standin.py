"""A local HTTP stand-in for the parts of the Hugging Face Hub API that zk0 uses.

It exists because the Hub cannot be reached from these machines: tests point huggingface_hub
at it (a custom endpoint, which the library supports) to check what zk0 sends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


class HubStandIn:
    """Records repos, committed files and tags; `fail_with` makes every call return that status."""

    def __init__(self):
        self.repos: set[str] = set()
        self.files: dict[str, dict[str, bytes]] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self.commits: list[tuple[str, str]] = []
        self.requests: list[str] = []
        self.card_metadata: list[dict] = []
        self.fail_with: int | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: dict | None = None):
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("X-Error-Message", "stand-in refused the request")
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(f"POST {self.path}")
                if hub.fail_with:
                    return self._send(hub.fail_with, {"error": "forbidden by the stand-in"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._validate_yaml(json.loads(body)["content"])
                if parts[:3] == ["api", "repos", "create"]:
                    payload = json.loads(body)
                    repo = f"{payload.get('organization') or 'user'}/{payload['name']}"
                    hub.repos.add(repo)
                    return self._send(200, {"url": f"{hub.endpoint}/{repo}", "name": repo, "id": repo})
                if len(parts) >= 6 and parts[0] == "api" and parts[1] == "models":
                    repo, action = f"{parts[2]}/{parts[3]}", parts[4]
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._send(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                        ]})
                    if action == "commit":
                        return self._commit(repo, body)
                    if action == "tag":
                        tag = json.loads(body)["tag"]
                        hub.tags.setdefault(repo, {})[tag] = parts[5]
                        return self._send(200, {})
                return self._send(404, {"error": f"stand-in does not serve {self.path}"})

            def _validate_yaml(self, content: str):
                # Like the Hub: the card's front matter must be YAML with known metadata fields.
                meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                if not isinstance(meta, dict) or "library_name" not in meta:
                    return self._send(400, {"errors": [{"message": "metadata must be YAML with library_name"}]})
                hub.card_metadata.append(meta)
                return self._send(200, {"warnings": []})

            def _commit(self, repo: str, body: bytes):
                files = hub.files.setdefault(repo, {})
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                oid = hashlib.sha1(body).hexdigest()
                hub.commits.append((repo, oid))
                return self._send(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{oid}", "commitOid": oid})

        return Handler
