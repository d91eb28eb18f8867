"""A local HTTP stand-in for the parts of the Hugging Face Hub API that zk0 uses.

It exists because the Hub cannot be reached from these machines: tests point huggingface_hub
at it (a custom endpoint, which the library supports) to check what zk0 sends.

Like the Hub, it answers the preupload call with uploadMode "lfs" for large or binary files (and
the suffixes a new repo's .gitattributes tracks with LFS), serves the Git LFS batch API, takes the
content with a PUT to the signed href it handed out, and accepts a commit's `lfsFile` only for an
object it holds. Every API call must carry the stand-in's token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import yaml

TOKEN = "hf_standin_token"
# What a new Hub repo's .gitattributes sends to LFS (an excerpt), and the Hub's size limit for regular files.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".npy", ".npz", ".parquet",
                ".arrow", ".zip", ".tar", ".gz")
REGULAR_MAX_BYTES = 10 * 2**20


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's choice: LFS for tracked suffixes, files over 10 MiB and binary content (a NUL in the sample)."""
    return path.endswith(LFS_SUFFIXES) or size > REGULAR_MAX_BYTES or b"\0" in sample


class HubStandIn:
    """Records repos, committed files (and which went through LFS) and tags; `fail_with` makes every call
    return that status."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.repos: set[str] = set()
        self.files: dict[str, dict[str, bytes]] = {}
        self.lfs_files: dict[str, set[str]] = {}  # per repo: paths committed as LFS pointers
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded through a signed href
        self.tags: dict[str, dict[str, str]] = {}
        self.commits: list[tuple[str, str]] = []
        self.requests: list[str] = []
        self.refused: list[str] = []  # requests refused for a missing or wrong token or signature
        self.card_metadata: list[dict] = []
        self.fail_with: int | None = None
        self._secret = secrets.token_bytes(16)
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

    def signature(self, oid: str) -> str:
        """What a signed upload href carries instead of the token (the Hub's are presigned storage URLs)."""
        return hmac.new(self._secret, oid.encode(), hashlib.sha256).hexdigest()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        """A handler class bound to this stand-in (the server makes one handler object per request)."""
        return type("Handler", (_HubHandler,), {"hub": self})


class _HubHandler(BaseHTTPRequestHandler):
    """Serves one request against `hub`, the stand-in's recorded state."""

    hub: HubStandIn

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("X-Error-Message", (body or {}).get("error", "stand-in refused the request"))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        data = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            data += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return data

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.hub.token}":
            return True
        self.hub.refused.append(f"{self.command} {self.path}")
        self._send(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def do_PUT(self):
        hub = self.hub
        url = urlsplit(self.path)
        body = self._body()
        hub.requests.append(f"PUT {url.path}")
        parts = url.path.strip("/").split("/")
        if parts[0] != "lfs-upload" or len(parts) != 2:
            return self._send(404, {"error": f"stand-in does not serve PUT {url.path}"})
        oid = parts[1]
        if not hmac.compare_digest(parse_qs(url.query).get("sig", [""])[0], hub.signature(oid)):
            hub.refused.append(f"PUT {url.path}")
            return self._send(403, {"error": "upload URL signature does not match"})
        if hashlib.sha256(body).hexdigest() != oid:
            return self._send(400, {"error": "content does not match its sha256"})
        hub.lfs_objects[oid] = body
        return self._send(200, {})

    def do_POST(self):
        hub = self.hub
        body = self._body()
        hub.requests.append(f"POST {self.path}")
        if not self._authorized():
            return None
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
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch("/".join(parts[:2]), json.loads(body))
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "verify"]:
            item = json.loads(body)
            stored = hub.lfs_objects.get(item["oid"])
            return self._send(200 if stored is not None and len(stored) == item["size"] else 404, {})
        if len(parts) >= 6 and parts[0] == "api" and parts[1] == "models":
            handled = self._model_call(parts, body)
            if handled is not None:
                return handled
        return self._send(404, {"error": f"stand-in does not serve {self.path}"})

    def _model_call(self, parts: list[str], body: bytes):
        """/api/models/<owner>/<name>/<action>/...: preupload, commit and tag; None for any other action."""
        repo, action = f"{parts[2]}/{parts[3]}", parts[4]
        if action == "preupload":
            return self._send(200, {"files": [{
                "path": f["path"], "shouldIgnore": False,
                "uploadMode": "lfs" if wants_lfs(f["path"], f["size"], base64.b64decode(f["sample"])) else "regular",
            } for f in json.loads(body)["files"]]})
        if action == "commit":
            return self._commit(repo, body)
        if action == "tag":
            tag = json.loads(body)["tag"]
            self.hub.tags.setdefault(repo, {})[tag] = parts[5]
            return self._send(200, {})
        return None

    def _lfs_batch(self, repo_git: str, request: dict):
        # Git LFS batch API, basic transfer: an upload href per object not held yet, and a verify step.
        hub = self.hub
        objects = []
        for obj in request["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in hub.lfs_objects:
                item["actions"] = {
                    "upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}?sig={hub.signature(obj['oid'])}"},
                    "verify": {"href": f"{hub.endpoint}/{repo_git}/info/lfs/objects/verify"},
                }
            objects.append(item)
        return self._send(200, {"transfer": "basic", "objects": objects})

    def _validate_yaml(self, content: str):
        # Like the Hub: the card's front matter must be YAML with known metadata fields.
        meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
        if not isinstance(meta, dict) or "library_name" not in meta:
            return self._send(400, {"errors": [{"message": "metadata must be YAML with library_name"}]})
        self.hub.card_metadata.append(meta)
        return self._send(200, {"warnings": []})

    def _commit(self, repo: str, body: bytes):
        hub = self.hub
        files, added = {}, set()
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "lfsFile":
                value = item["value"]
                if value["oid"] not in hub.lfs_objects:  # the Hub refuses a pointer to content it never got
                    error = f"LFS object {value['oid']} of {value['path']} was never uploaded"
                    return self._send(400, {"error": error})
                files[value["path"]] = hub.lfs_objects[value["oid"]]
                added.add(value["path"])
        hub.files.setdefault(repo, {}).update(files)
        lfs = hub.lfs_files.setdefault(repo, set())
        lfs.difference_update(files)
        lfs.update(added)
        oid = hashlib.sha1(body).hexdigest()
        hub.commits.append((repo, oid))
        return self._send(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{oid}", "commitOid": oid})
