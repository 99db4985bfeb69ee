"""A local stand-in for the Hugging Face Hub's upload protocol (the Hub is unreachable here).

It speaks the routes `huggingface_hub` calls for `create_repo` + `upload_folder` (see
/work/shared/reference/recipes.md §3): repo creation (409 with a `url` when it exists), YAML
validation, preupload (always "regular": files come inline, no LFS/Xet), and the ndjson commit.
Commits are kept in memory so tests can check exactly which bytes arrived, with which token.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class HubDouble:
    def __init__(self, token: str = "hf_test_token") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> HubDouble:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": "not found"})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self._body()
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._reply(200, {"errors": [], "warnings": []})
                if not self._authorized():
                    return None
                if parts == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo_id = (
                        f"{req['organization']}/{req['name']}"
                        if req.get("organization")
                        else req["name"]
                    )
                    url = f"{hub.url}/{repo_id}"
                    if repo_id in hub.repos:
                        return self._reply(
                            409, {"error": "You already created this model repo", "url": url}
                        )
                    private = req.get("private", req.get("visibility") == "private")
                    hub.repos[repo_id] = Repo(private=bool(private))
                    return self._reply(200, {"url": url, "name": repo_id})
                if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ]
                        },
                    )
                if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    repo_id = f"{parts[2]}/{parts[3]}"
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._reply(404, {"error": f"Repository not found: {repo_id}"})
                    summary = ""
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            summary = item["value"].get("summary", "")
                        elif item["key"] == "file":
                            v = item["value"]
                            repo.files[v["path"]] = base64.b64decode(v["content"])
                        elif item["key"] == "deletedFile":
                            repo.files.pop(item["value"]["path"], None)
                    repo.commits.append(summary)
                    oid = f"{len(repo.commits):040x}"
                    return self._reply(
                        200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid}
                    )
                return self._reply(404, {"error": f"no route {self.path}"})

        return Handler
