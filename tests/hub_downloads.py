"""The Hub stand-in (tests/hub_standin.py) serving downloads: what the real huggingface_hub client calls for
`snapshot_download`, `hf_hub_download`, `HfApi.repo_info`, `list_repo_tree` and `list_repo_refs`.

A test points a zk0 process at it with HF_ENDPOINT (huggingface_hub reads it at import) and HF_HUB_OFFLINE=0;
nothing inside the client is replaced. Repos are folders on disk, each commit one folder: `main` is the
newest, a tag or a commit id serves an older one. Like the Hub, it answers a missing repo, and a private one
asked for without the token, with 401 and X-Error-Code RepoNotFound (404 with a token), an unknown revision
with RevisionNotFound, a missing file with EntryNotFound; files carry ETag, X-Repo-Commit, Content-Length, and
a Range request gets 206. `cut` makes it drop the connection midway through a file, once: the client resumes
with a Range request; with `down`, it then answers nothing but 503 until `cut` is cleared: the Hub gone
mid-download.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from hub_standin import HubStandIn, _HubHandler

TYPES = {"models": "model", "datasets": "dataset"}


def git_blob_id(data: bytes) -> str:
    """The id Git (and the Hub's ETag for a regular file) gives this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One served repo: commits oldest first as (commit id, folder), tags naming commits, private or not."""

    repo_id: str
    repo_type: str
    commits: list[tuple[str, Path]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    private: bool = False

    def folder(self, revision: str | None) -> tuple[str, Path] | None:
        """(commit id, folder) of a branch (main), tag or commit id; None when the repo has no such revision."""
        if revision in (None, "", "main"):
            return self.commits[-1]
        wanted = self.tags.get(revision, revision)
        return next(((sha, path) for sha, path in self.commits if sha == wanted), None)


@dataclass
class Cut:
    """Drop the connection after `after` bytes of the first GET of a file whose path ends with `suffix`;
    with `down`, answer every later request with 503."""

    suffix: str
    after: int
    down: bool = False
    done: bool = False


class HubDownloads(HubStandIn):
    """The stand-in with repos to download; `requests` records every call, `ranges` each Range asked for."""

    def __init__(self, token: str = "hf_standin_token"):
        super().__init__(token)
        self.served: dict[tuple[str, str], Repo] = {}
        self.ranges: list[tuple[str, str]] = []  # (path, Range header) of every ranged GET
        self.cut: Cut | None = None

    def add(self, repo_id: str, repo_type: str, folder: Path, *, tags: tuple[str, ...] = (),
            private: bool = False) -> str:
        """Serve `folder` as the newest commit of a repo (made on first use); returns the commit id."""
        repo = self.served.setdefault((repo_type, repo_id), Repo(repo_id, repo_type, private=private))
        listing = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        sha = hashlib.sha1(f"{repo_type}/{repo_id}#{len(repo.commits)}:{listing}".encode()).hexdigest()
        repo.commits.append((sha, Path(folder)))
        repo.tags.update(dict.fromkeys(tags, sha))
        return sha

    def _handler(self):
        return type("Handler", (_DownloadHandler,), {"hub": self})


class _DownloadHandler(_HubHandler):
    hub: HubDownloads

    def _error(self, status: int, code: str | None, message: str):
        """An error answer the way the Hub gives it: the code and message in headers, which the client reads."""
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_HEAD(self):
        self._serve()

    def do_GET(self):
        self._serve()

    def _serve(self):
        hub = self.hub
        url = urlsplit(self.path)
        hub.requests.append(f"{self.command} {url.path}")
        if hub.cut is not None and hub.cut.done and hub.cut.down:
            return self._error(503, None, "Service Unavailable")
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in TYPES:
            return self._api(TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:], parse_qs(url.query))
        repo_type = "dataset" if parts[0] == "datasets" else "model"
        parts = parts[1:] if repo_type == "dataset" else parts
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return self._error(404, None, f"stand-in does not serve {url.path}")

    def _repo(self, repo_type: str, repo_id: str) -> Repo | None:
        """The repo when it exists and the caller may read it; else the Hub's answer has been sent."""
        repo = self.hub.served.get((repo_type, repo_id))
        auth = self.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {self.hub.token}":
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.private and auth is None):
            # The Hub says the same for a missing repo and a private one: it never confirms a private repo exists.
            self._error(401 if auth is None else 404, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _revision(self, repo: Repo, revision: str | None) -> tuple[str, Path] | None:
        found = repo.folder(revision)
        if found is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return found

    def _api(self, repo_type: str, repo_id: str, rest: list[str], query: dict):
        if (repo := self._repo(repo_type, repo_id)) is None:
            return None
        if rest and rest[0] == "refs":  # list_repo_refs
            main = repo.commits[-1][0]
            return self._send(200, {
                "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": main}],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in repo.tags.items()],
                "converts": [],
            })
        if not rest or rest[0] == "revision":  # repo_info
            if (found := self._revision(repo, "/".join(rest[1:]) or None)) is None:
                return None
            sha, folder = found
            siblings = [{"rfilename": path} for path, _ in _files(folder)]
            return self._send(200, {"id": repo_id, "sha": sha, "private": repo.private, "siblings": siblings,
                                    "tags": [], "downloads": 0, "likes": 0})
        if rest[0] == "tree":  # list_repo_tree (recursive, one page)
            if (found := self._revision(repo, rest[1] if len(rest) > 1 else None)) is None:
                return None
            return self._send(200, [{"type": "file", "oid": git_blob_id(path.read_bytes()), "size": path.stat().st_size,
                                     "path": rel} for rel, path in _files(found[1])])
        return self._error(404, None, f"stand-in does not serve /api/.../{'/'.join(rest)}")

    def _file(self, repo_type: str, repo_id: str, revision: str, rel: str):
        hub = self.hub
        if (repo := self._repo(repo_type, repo_id)) is None or (found := self._revision(repo, revision)) is None:
            return None
        sha, folder = found
        path = folder / rel
        if not path.is_file():
            return self._error(404, "EntryNotFound", f"{rel} does not exist on {revision}")
        data = path.read_bytes()
        start = 0
        if (asked := self.headers.get("Range")) and self.command == "GET":
            hub.ranges.append((rel, asked))
            start = int(asked.removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("ETag", f'"{git_blob_id(data)}"')
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return None
        cut = hub.cut
        if cut is not None and not cut.done and not start and rel.endswith(cut.suffix):
            self.wfile.write(data[:cut.after])
            self.wfile.flush()
            cut.done = True  # with cut.down, the Hub is gone from now on: every request gets 503
            self.close_connection = True
            return None
        self.wfile.write(data[start:])
        return None


def _files(folder: Path) -> list[tuple[str, Path]]:
    return sorted((str(p.relative_to(folder)), p) for p in Path(folder).rglob("*") if p.is_file())
