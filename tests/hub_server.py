"""A loopback, in-memory imitation of the Hugging Face Hub HTTP API, for tests.

`FakeHub` runs a stdlib `ThreadingHTTPServer` in a daemon thread on 127.0.0.1 and
answers the subset of endpoints that `huggingface_hub`, `transformers` and
`datasets` use to create repos, upload (regular + plain LFS, no Xet), list and
download files. Point the libraries at it with `configure_env(hub.url, hf_home)`
*before* importing them: several of them read `HF_ENDPOINT` at import time.

State is a dict `(repo_type, repo_id) -> _Repo`; each commit is a full snapshot
`{path: _Blob}` with a fresh random 40-hex sha, and branches point at shas, so
`main` moves on every commit and any old sha stays resolvable.
Unhandled requests get a 501 and are printed to stderr (never a silent 200).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import secrets
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Files stored through LFS whatever their size (the real Hub decides via .gitattributes).
_LFS_SUFFIXES = (".parquet", ".arrow", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".npy",
                 ".npz", ".onnx", ".msgpack", ".pkl", ".zip", ".gz", ".tar", ".zst", ".model", ".tflite")
_LFS_MIN_SIZE = 10 * 1024 * 1024
_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in _LFS_SUFFIXES)


class HubError(Exception):
    """An HTTP error answer: status, `X-Error-Code` header and message."""

    def __init__(self, status: int, code: str | None, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class _Blob:
    """Immutable file content plus the hashes the Hub reports for it."""

    def __init__(self, data: bytes, lfs: bool):
        self.data, self.lfs = data, lfs
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.git_sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def entry(self, path: str) -> dict:
        """Tree / paths-info entry for this blob at `path`."""
        out = {"type": "file", "path": path, "size": len(self.data), "oid": self.git_sha}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return out


class _Repo:
    """One repository: commit snapshots by sha and branch -> sha refs."""

    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.repo_type, self.repo_id, self.private = repo_type, repo_id, private
        self.commits: dict[str, dict[str, _Blob]] = {}
        self.branches: dict[str, str] = {}
        self.commit({".gitattributes": _Blob(_GITATTRIBUTES, False)}, "main")

    def commit(self, files: dict[str, _Blob], branch: str) -> str:
        sha = secrets.token_hex(20)
        self.commits[sha] = files
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> tuple[str, dict[str, _Blob]]:
        """Map a branch name or a commit sha to (sha, snapshot); 404 RevisionNotFound otherwise."""
        sha = self.branches.get(revision, revision)
        if sha not in self.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, self.commits[sha]


class FakeHub:
    """In-memory Hub served over HTTP on loopback. See the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self._thread: threading.Thread | None = None

    def start(self) -> "FakeHub":
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="FakeHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        """Forget all repos, LFS objects and the request log."""
        with self.lock:
            self.repos.clear()
            self.lfs_store.clear()
            self.requests.clear()

    def repo(self, repo_type: str, repo_id: str) -> _Repo:
        """The repo, or a 404 RepoNotFound error."""
        try:
            return self.repos[(repo_type, repo_id)]
        except KeyError:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_type}/{repo_id}") from None

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Sorted file paths of `repo_id` at `revision` (test helper, raises HubError)."""
        with self.lock:
            return sorted(self.repo(repo_type, repo_id).resolve(revision)[1])

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        """Content of one file (test helper; KeyError for a missing path, HubError for repo/revision)."""
        with self.lock:
            return self.repo(repo_type, repo_id).resolve(revision)[1][path].data


def configure_env(url: str, hf_home: str) -> None:
    """Point huggingface_hub / transformers / datasets at `url`, with caches under `hf_home`."""
    os.environ.update({
        "HF_ENDPOINT": url, "HF_TOKEN": "hf_fake_token", "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": hf_home,
    })
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_TOKEN_PATH"):
        os.environ.pop(var, None)


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to a FakeHub method; answers errors as the Hub does (X-Error-Code)."""

    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length

    def log_message(self, format, *args):  # noqa: A002 - silence per-request stderr lines
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
        """Queue the answer; `_dispatch` writes it once the hub lock is released."""
        self.answer = (status, body, {"Content-Type": ctype, "Content-Length": str(len(body)), **(headers or {})})
        return True

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        return self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self):
        method = self.command
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.data = self._body()
        hub.requests.append((method, unquote(split.path)))
        # Split the raw path first: revisions such as "refs%2Fconvert%2Fparquet" are one segment.
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        try:
            with hub.lock:
                if not self._route(hub, method, parts):
                    print(f"[FakeHub] 501 unhandled: {method} {self.path}", file=sys.stderr)
                    self._json({"error": f"FakeHub does not implement {method} {self.path}"}, 501)
        except HubError as e:
            headers = {"X-Error-Message": e.message.encode("ascii", "replace").decode()}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message, **e.extra}, e.status, headers)
        except Exception:  # a bug or a malformed request: answer 500 rather than dropping the connection
            traceback.print_exc()
            self._json({"error": f"FakeHub crashed on {method} {self.path}"}, 500)
        status, body, headers = self.answer
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _route(self, hub: FakeHub, method: str, p: list[str]) -> bool:
        """Dispatch on (method, path segments); return False when nothing matched."""
        if p[0] == "api":
            if p[1:] == ["agent-harnesses"]:
                return self._json({"standardEnvVars": [], "harnesses": {}})
            if p[1:] == ["validate-yaml"] and method == "POST":
                return self._json({"errors": [], "warnings": []})
            if p[1:] == ["whoami-v2"]:
                return self._json({"type": "user", "name": "fake-user", "orgs": [],
                                   "auth": {"accessToken": {"role": "write"}}})
            if p[1:3] == ["repos", "create"] and method == "POST":
                return self._create_repo(hub)
            if p[1:3] == ["repos", "delete"] and method == "DELETE":
                body = json.loads(self.data)
                repo_id = f"{body.get('organization') or 'fake-user'}/{body['name']}"
                hub.repos.pop((body.get("type") or "model", repo_id), None)
                return self._json({})
            if len(p) >= 4 and p[1] in _TYPE_FROM_PLURAL:
                return self._api_repo(hub, method, _TYPE_FROM_PLURAL[p[1]], f"{p[2]}/{p[3]}", p[4:])
            return False
        repo_type = "model"
        if p[0] in ("datasets", "spaces"):
            repo_type, p = _TYPE_FROM_PLURAL[p[0]], p[1:]
        if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(hub.repo(repo_type, f"{p[0]}/{p[1]}"), p[3], "/".join(p[4:]))
        if len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(hub, repo_type, f"{p[0]}/{p[1][:-4]}")
        if len(p) == 2 and p[0] == "lfs-upload" and method == "PUT":
            if hashlib.sha256(self.data).hexdigest() != p[1]:
                raise HubError(400, None, "sha256 mismatch for uploaded LFS object")
            hub.lfs_store[p[1]] = self.data
            return self._send(200)
        return False

    # -- endpoints ----------------------------------------------------------------------------
    def _create_repo(self, hub: FakeHub):
        body = json.loads(self.data)
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or 'fake-user'}/{body['name']}"
        url = f"{hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in hub.repos:  # the client reads "url" even from the 409 (exist_ok=True)
            raise HubError(409, None, "You already created this repo", url=url)
        private = body.get("visibility", "public") != "public" or bool(body.get("private"))
        hub.repos[(repo_type, repo_id)] = _Repo(repo_type, repo_id, private)
        return self._json({"url": url, "name": repo_id})

    def _api_repo(self, hub: FakeHub, method: str, repo_type: str, repo_id: str, rest: list[str]) -> bool:
        repo = hub.repo(repo_type, repo_id)
        action = rest[0] if rest else ""
        if method == "GET" and (not rest or (action == "revision" and len(rest) == 2)):
            sha, files = repo.resolve(rest[1] if rest else "main")
            now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
            siblings = [{"rfilename": k, "size": len(b.data), "blobId": b.git_sha} for k, b in sorted(files.items())]
            return self._json({"_id": sha[:24], "id": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                               "private": repo.private, "disabled": False, "gated": False, "downloads": 0,
                               "likes": 0, "tags": [], "siblings": siblings, "lastModified": now,
                               "createdAt": now})
        if method == "GET" and action == "refs":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
            return self._json({"branches": branches, "tags": [], "converts": []})
        if len(rest) < 2:
            return False
        sha, files = repo.resolve(rest[1])
        if method == "GET" and action == "tree":
            recursive = self.query.get("recursive", "false").lower() in ("1", "true")
            return self._json(_tree(files, "/".join(rest[2:]).strip("/"), recursive, sha))
        if method == "POST" and action == "paths-info":
            if self.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(self.data).get("paths", [])
            else:
                paths = parse_qs(self.data.decode()).get("paths", [])
            entries = [e for path in paths for e in _tree(files, path.strip("/"), False, sha, self_entry=True)]
            return self._json(entries)
        if method == "POST" and action == "preupload":
            out = []
            for f in json.loads(self.data)["files"]:
                binary = b"\0" in base64.b64decode(f.get("sample", ""))
                lfs = f["size"] >= _LFS_MIN_SIZE or f["path"].lower().endswith(_LFS_SUFFIXES) or binary
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
            return self._json({"files": out})
        if method == "POST" and action == "commit":
            return self._commit(hub, repo, rest[1], dict(files))
        return False

    def _commit(self, hub: FakeHub, repo: _Repo, branch: str, files: dict[str, _Blob]):
        if branch not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Branch not found: {branch} (commit to a sha is refused)")
        for line in self.data.decode().splitlines():
            if not line.strip():
                continue
            op = json.loads(line)
            key, value = op["key"], op["value"]
            if key == "file":
                files[value["path"]] = _Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in hub.lfs_store:
                    raise HubError(422, None, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = _Blob(hub.lfs_store[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "EntryNotFound", f"Cannot delete missing file {value['path']}")
            elif key == "deletedFolder":
                prefix = value["path"].strip("/") + "/"
                for path in [p for p in files if p.startswith(prefix)]:
                    del files[path]
            elif key != "header":
                raise HubError(400, None, f"Unknown commit operation {key!r}")
        sha = repo.commit(files, branch)
        url = f"{hub.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{sha}"
        return self._json({"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _lfs_batch(self, hub: FakeHub, repo_type: str, repo_id: str):
        hub.repo(repo_type, repo_id)
        objects = []
        for obj in json.loads(self.data)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in hub.lfs_store:
                entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        return self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                          ctype="application/vnd.git-lfs+json")

    def _resolve(self, repo: _Repo, revision: str, path: str):
        sha, files = repo.resolve(revision)
        blob = files.get(path)
        if blob is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist at revision {revision}")
        etag = blob.sha256 if blob.lfs else blob.git_sha
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(blob.data))})
        data, status = blob.data, 200
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and "," not in rng and data:
            start_s, _, end_s = rng[6:].partition("-")
            start = len(data) - int(end_s) if not start_s else int(start_s)
            end = len(data) - 1 if not start_s or not end_s else min(int(end_s), len(data) - 1)
            if start >= len(data) or start > end:
                raise HubError(416, None, f"Range not satisfiable: {rng}")
            start = max(start, 0)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        return self._send(status, data, headers, ctype="application/octet-stream")


def _tree(files: dict[str, _Blob], path: str, recursive: bool, sha: str, self_entry: bool = False) -> list[dict]:
    """Entries under directory `path` ("" = root), or, with self_entry, the entry *at* `path`.

    A missing directory is a 404 EntryNotFound (datasets relies on it); for paths-info
    (`self_entry=True`) a missing path simply yields no entry.
    """
    def folder(p: str) -> dict:
        return {"type": "directory", "path": p, "oid": hashlib.sha1(f"{sha}:{p}".encode()).hexdigest()}

    prefix = path + "/" if path else ""
    if self_entry:
        if path in files:
            return [files[path].entry(path)]
        return [folder(path)] if path and any(p.startswith(prefix) for p in files) else []
    if path and not any(p.startswith(prefix) for p in files):
        raise HubError(404, "EntryNotFound", f"Directory {path} not found")
    entries, dirs = [], set()
    for full in sorted(files):
        if not full.startswith(prefix):
            continue
        parts = full[len(prefix):].split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            dirs.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append(files[full].entry(full))
    return [folder(d) for d in sorted(dirs)] + entries
