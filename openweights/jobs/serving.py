"""Serve models over an OpenAI-compatible API inside a job (worker side; used by `api` and
`inspect_ai` jobs).

Two processes, one picture:

```
caller ──Bearer <key>──▶ front (this process: auth, model names, idle clock)
                            └──▶ model server on 127.0.0.1 (vllm serve | transformers serve)
```

* The model server is `vllm serve` on CUDA when vLLM is installed (LoRA adapters through its
  LoRA support, `--api-key` set as well), else `transformers serve` on CPU. It only ever binds
  the loopback interface: `transformers serve` has no authentication of its own.
* The front is a small ASGI proxy in the job's own process. It is the only thing reachable from
  outside and answers only requests carrying the deployment's key; it maps the names callers use
  (`model` as given to `deploy`, a registered model, a LoRA adapter) to what the model server
  loaded, and keeps the time of the last request so the job can stop when idle.
* Where the front is reachable: `OW_DEPLOY_PUBLIC_URL` when a worker sets it (a host port
  mapping); on RunPod (`RUNPOD_POD_ID` set) port 8000 through RunPod's HTTPS proxy, as the
  original did; otherwise loopback (a local worker next to the server).

```python
with serve(["./tiny"], ow=ow) as s:          # blocks until the models answer
    s.base_url, s.api_key, s.models          # http://127.0.0.1:PORT/v1, key, public names
```
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openweights._exceptions import OpenWeightsError

if TYPE_CHECKING:
    from openweights.client._client import OpenWeights
    from openweights.jobs.model_source import LocalModel

__all__ = [
    "ModelServerError",
    "ServedModel",
    "Serving",
    "ServingOptions",
    "is_vllm_available",
    "pick_engine",
    "serve",
]

#: Port RunPod pods expose over their HTTPS proxy (`https://{pod}-8000.proxy.runpod.net`).
RUNPOD_PORT = 8000
#: Seconds between readiness probes of the model server.
PROBE_INTERVAL_S = 0.2
#: Upstream paths the front forwards (OpenAI wire API).
FORWARDED = ("chat/completions", "completions")


class ModelServerError(OpenWeightsError):
    """The model server did not start or stopped; the message carries its output's tail."""


def is_vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def pick_engine(requested: str | None = None) -> str:
    """`vllm` on CUDA when installed, else `transformers` (CPU)."""
    if requested and requested != "auto":
        if requested == "vllm" and not is_vllm_available():
            raise ModelServerError('vLLM is not installed: pip install "openweights[vllm]"')
        return requested
    if not is_vllm_available():  # checked first: importing torch costs seconds
        return "transformers"
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    return "vllm" if cuda else "transformers"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServingOptions:
    """Engine knobs (names and defaults as the original's `ApiConfig`)."""

    max_model_len: int = 2048
    max_num_seqs: int = 16
    max_lora_rank: int = 16
    max_loras: int | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    engine: str = "auto"
    #: seconds to wait for the model server to answer
    ready_timeout_s: float = 3600.0


@dataclass
class ServedModel:
    """A name callers use and what the model server knows it by."""

    name: str
    upstream: str
    base: str
    adapter: str | None = None


@dataclass
class Serving:
    """A running deployment: the front's URL and key, and what it serves."""

    base_url: str
    api_key: str
    models: list[ServedModel]
    engine: str
    front: Front
    process: subprocess.Popen
    upstream_url: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


# ---------------------------------------------------------------- resolving the models


def _merge_adapter(m: LocalModel, out: Path) -> Path:
    """`transformers serve` cannot load adapters: merge one into a full model directory."""
    from openweights.jobs.model_source import load_model

    if (out / "config.json").exists():
        return out
    model, tokenizer = load_model(m, merge=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def resolve_served(
    models: list[str], *, ow: OpenWeights | None, engine: str, workdir: Path
) -> list[ServedModel]:
    """One `ServedModel` per name; adapters bring their base (served under its own name too).

    All adapters must share one base model: one server per base."""
    from openweights.jobs.model_source import resolve_model

    resolved = [resolve_model(ref, ow=ow) for ref in models]
    bases = {m.base for m in resolved}
    if len(bases) > 1:
        raise ModelServerError(
            "one deployment serves one base model and its LoRA adapters; got bases "
            + ", ".join(sorted(bases))
            + " (use ow.api.multi_deploy to get one deployment per base)"
        )
    out: list[ServedModel] = []
    names = set()
    base = resolved[0].base
    base_name = next((m.name for m in resolved if not m.is_adapter), None)
    if base_name is None:  # only adapters were named: serve the base under its own reference
        base_name = base
    out.append(ServedModel(name=base_name, upstream=base_name, base=base))
    names.add(base_name)
    for i, m in enumerate(resolved):
        if not m.is_adapter or m.name in names:
            continue
        upstream = m.name
        if engine == "transformers":
            upstream = str(_merge_adapter(m, workdir / "merged" / f"adapter-{i}"))
        out.append(ServedModel(name=m.name, upstream=upstream, base=base, adapter=m.adapter))
        names.add(m.name)
    if engine == "transformers":
        for s in out:
            if s.adapter is None:
                s.upstream = base  # `transformers serve` loads by the request's model (a path)
    return out


# ---------------------------------------------------------------- the model server process


def _command(
    engine: str, served: list[ServedModel], port: int, key: str, o: ServingOptions
) -> list[str]:
    if engine == "vllm":
        base = served[0]
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", base.base,
            "--host", "127.0.0.1", "--port", str(port), "--api-key", key,
            "--served-model-name", base.name,
            "--max-model-len", str(o.max_model_len),
            "--max-num-seqs", str(o.max_num_seqs),
            "--tensor-parallel-size", os.environ.get("N_GPUS") or "1",
        ]  # fmt: skip
        adapters = [s for s in served if s.adapter]
        if adapters:
            cmd += ["--enable-lora", "--max-lora-rank", str(o.max_lora_rank)]
            cmd += ["--max-loras", str(o.max_loras or len(adapters))]
            cmd += ["--lora-modules", *[f"{s.name}={s.adapter}" for s in adapters]]
        if o.quantization:
            cmd += ["--quantization", o.quantization]
        if o.kv_cache_dtype:
            cmd += ["--kv-cache-dtype", o.kv_cache_dtype]
        return cmd
    exe = shutil.which("transformers", path=os.path.dirname(sys.executable)) or shutil.which(
        "transformers"
    )
    if exe is None:
        raise ModelServerError(
            '`transformers serve` is not installed: pip install "transformers[serving]"'
        )
    cmd = [exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    # models stay loaded for the life of the deployment (the job decides when to stop)
    cmd += ["--model-timeout", str(10**8), "--log-level", "warning"]
    if o.quantization:
        cmd += ["--quantization", o.quantization]
    return cmd


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


def _wait_ready(
    proc: subprocess.Popen,
    url: str,
    key: str,
    served: list[ServedModel],
    log: Path,
    timeout_s: float,
) -> None:
    """Until every model answers a one-token completion (which loads it, too)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {key}"}
    pending = list(served)
    with httpx.Client(timeout=httpx.Timeout(600, connect=2), trust_env=False) as http:
        while pending:
            if proc.poll() is not None:
                raise ModelServerError(
                    f"the model server exited with code {proc.returncode} before it answered:\n"
                    + _tail(log)
                )
            if time.monotonic() > deadline:
                raise ModelServerError(
                    f"the model server did not answer within {timeout_s:g} s:\n" + _tail(log)
                )
            m = pending[0]
            # a text completion: base models without a chat template answer it too
            body = {"model": m.upstream, "prompt": "hi", "max_tokens": 1}
            try:
                r = http.post(f"{url}/v1/completions", json=body, headers=headers)
            except httpx.TransportError:
                time.sleep(PROBE_INTERVAL_S)  # not listening yet; nothing to be woken by
                continue
            if r.status_code == 200:
                pending.pop(0)
            elif r.status_code in (404, 503):  # vLLM: still loading / LoRA not registered yet
                time.sleep(PROBE_INTERVAL_S)
            else:
                raise ModelServerError(
                    f"the model server answered {r.status_code} for model {m.name!r}: "
                    f"{r.text[:1000]}\n" + _tail(log)
                )


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    # The model server shares the job's process group: the worker's SIGTERM/SIGKILL of the
    # group reaches it even when this process is killed first.
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


# ---------------------------------------------------------------- the front


class Front:
    """Authenticating proxy in front of the model server; runs uvicorn in a thread."""

    def __init__(
        self, *, upstream_url: str, upstream_key: str, key: str, models: list[ServedModel]
    ) -> None:
        self.upstream_url = upstream_url
        self.upstream_key = upstream_key
        self.key = key
        self.names = {m.name: m.upstream for m in models}
        self.last_active = time.monotonic()
        self.in_flight = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # ---- idle clock
    def idle_s(self) -> float:
        return 0.0 if self.in_flight else time.monotonic() - self.last_active

    def touch(self) -> None:
        self.last_active = time.monotonic()

    # ---- ASGI app
    def app(self) -> Any:
        import httpx
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        client: dict[str, Any] = {}
        try:  # a fifth of httpx's CPU per request (bench/bench_serving.py); vLLM brings it
            import aiohttp
        except ImportError:
            aiohttp = None

        async def send(
            path: str, body: bytes, headers: dict[str, str]
        ) -> tuple[int, Any, Any, Any]:
            """(status, headers, body chunks, close) once the upstream's headers are in."""
            url = f"{self.upstream_url}/v1/{path}"
            if aiohttp is not None:
                if "a" not in client:
                    client["a"] = aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                        connector=aiohttp.TCPConnector(limit=0),
                        auto_decompress=False,
                    )
                r = await client["a"].post(url, data=body, headers=headers)
                return r.status, r.headers, r.content.iter_any(), r.release
            if "h" not in client:
                client["h"] = httpx.AsyncClient(
                    timeout=httpx.Timeout(None, connect=5),
                    limits=httpx.Limits(max_keepalive_connections=64, max_connections=None),
                    trust_env=False,
                )
            h = client["h"]
            r = await h.send(
                h.build_request("POST", url, content=body, headers=headers), stream=True
            )
            return r.status_code, r.headers, r.aiter_raw(), r.aclose

        async def close(fn: Any) -> None:
            result = fn()
            if hasattr(result, "__await__"):
                await result

        def error(status: int, type_: str, message: str, param: str | None = None):
            return JSONResponse(
                {"error": {"type": type_, "message": message, "param": param}}, status_code=status
            )

        def authorized(request: Request) -> bool:
            scheme, _, secret = request.headers.get("authorization", "").partition(" ")
            return scheme.lower() == "bearer" and secrets.compare_digest(
                secret.strip().encode(), self.key.encode()
            )

        async def health(_request: Request):
            return JSONResponse({"status": "ok"})

        async def models(request: Request):
            if not authorized(request):
                return error(401, "unauthorized", "Missing or wrong deployment key.")
            data = [{"id": n, "object": "model", "owned_by": "openweights"} for n in self.names]
            return JSONResponse({"object": "list", "data": data})

        async def keepalive(request: Request):
            if not authorized(request):
                return error(401, "unauthorized", "Missing or wrong deployment key.")
            self.touch()
            return JSONResponse({"status": "ok"})

        async def forward(request: Request):
            if not authorized(request):
                return error(401, "unauthorized", "Missing or wrong deployment key.")
            path = request.url.path.removeprefix("/v1/")
            try:
                body = json.loads(await request.body())
                name = body["model"]
            except (ValueError, KeyError, TypeError):
                return error(
                    400, "invalid_request", "The body must be JSON with a `model`.", "model"
                )
            upstream = self.names.get(name)
            if upstream is None:
                return error(
                    404,
                    "model_not_deployed",
                    f"This deployment does not serve model {name!r}; it serves: "
                    + ", ".join(self.names),
                    "model",
                )
            body["model"] = upstream
            self.in_flight += 1
            self.touch()
            try:
                status, up_headers, body_chunks, release = await send(
                    path,
                    json.dumps(body).encode(),
                    {
                        "content-type": "application/json",
                        "authorization": f"Bearer {self.upstream_key}",
                    },
                )
            except Exception:
                self.in_flight -= 1
                self.touch()
                raise
            headers = {
                k: v
                for k, v in up_headers.items()
                if k.lower() in ("content-type", "cache-control")
            }

            async def chunks():
                try:
                    if upstream == name:
                        async for chunk in body_chunks:
                            yield chunk
                    else:
                        async for event in _renamed_events(body_chunks, upstream, name):
                            yield event
                finally:
                    await close(release)
                    self.in_flight -= 1
                    self.touch()

            if "text/event-stream" in up_headers.get("content-type", ""):
                return StreamingResponse(chunks(), status_code=status, headers=headers)
            try:
                content = b"".join([c async for c in body_chunks])
            finally:
                await close(release)
                self.in_flight -= 1
                self.touch()
            if upstream != name:
                content = _rename(content, upstream, name)
            return Response(content, status_code=status, headers=headers)

        @contextlib.asynccontextmanager
        async def lifespan(_app: Any):
            yield
            if "a" in client:
                await client["a"].close()
            if "h" in client:
                await client["h"].aclose()

        return Starlette(
            routes=[
                Route("/health", health),
                Route("/v1/models", models),
                Route("/ow/keepalive", keepalive, methods=["POST"]),
                *[Route(f"/v1/{p}", forward, methods=["POST"]) for p in FORWARDED],
            ],
            lifespan=lifespan,
        )

    def start(self, host: str, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(
            self.app(), host=host, port=port, log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.port = port
        self._thread = threading.Thread(target=self._server.run, name="ow-front", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ModelServerError(f"the deployment's front could not listen on {host}:{port}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)


async def _renamed_events(chunks: Any, upstream: str, name: str) -> Any:
    """SSE chunks with the model renamed, one whole event at a time: a chunk from the model server
    may end inside the model string, which a per-chunk replace would miss."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        cut = pending.rfind(b"\n\n")
        if cut >= 0:
            yield _rename(pending[: cut + 2], upstream, name)
            pending = pending[cut + 2 :]
    if pending:
        yield _rename(pending, upstream, name)


def _rename(chunk: bytes, upstream: str, name: str) -> bytes:
    """Answers name the model as the caller did, not by the server's local path."""
    a = json.dumps(upstream)[1:-1].encode()
    b = json.dumps(name)[1:-1].encode()
    return chunk.replace(b'"model":"' + a + b'"', b'"model":"' + b + b'"').replace(
        b'"model": "' + a + b'"', b'"model": "' + b + b'"'
    )


def public_endpoint() -> tuple[str, int, str]:
    """(bind host, port, URL callers use) for the front; see the module docstring."""
    explicit = os.environ.get("OW_DEPLOY_PUBLIC_URL")
    if explicit:
        port = int(os.environ.get("OW_DEPLOY_PORT") or RUNPOD_PORT)
        return "0.0.0.0", port, explicit.rstrip("/")
    pod = os.environ.get("RUNPOD_POD_ID")
    if pod:
        return "0.0.0.0", RUNPOD_PORT, f"https://{pod}-{RUNPOD_PORT}.proxy.runpod.net"
    port = free_port()
    return "127.0.0.1", port, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serve(
    models: list[str],
    *,
    ow: OpenWeights | None = None,
    options: ServingOptions | None = None,
    workdir: Path | None = None,
    public: bool = True,
    log_path: Path | None = None,
    aliases: dict[str, str] | None = None,
) -> Iterator[Serving]:
    """Start the model server and its front; yield once every model answers; stop both after.

    `public=False` binds the front to loopback whatever the environment says (in-job clients
    such as `inspect eval`). `aliases`: more names for served models (`{alias: name}`). The
    model server's output goes to `log_path` and this process's stdout (the run's log)."""
    o = options or ServingOptions()
    engine = pick_engine(o.engine)
    workdir = Path(workdir or os.getcwd())
    served = resolve_served(models, ow=ow, engine=engine, workdir=workdir)
    port = free_port()
    upstream_key = secrets.token_urlsafe(24)
    key = secrets.token_urlsafe(32)
    log = log_path or workdir / "model_server.log"
    cmd = _command(engine, served, port, upstream_key, o)
    print(f"[openweights] starting {engine}: {' '.join(cmd[:6])} …", flush=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    logf = open(log, "ab")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    pump = threading.Thread(target=_pump, args=(proc, logf), daemon=True)
    pump.start()
    front: Front | None = None
    try:
        upstream_url = f"http://127.0.0.1:{port}"
        _wait_ready(proc, upstream_url, upstream_key, served, log, o.ready_timeout_s)
        front = Front(upstream_url=upstream_url, upstream_key=upstream_key, key=key, models=served)
        for alias, name in (aliases or {}).items():
            front.names.setdefault(alias, front.names[name])
        if public:
            host, fport, url = public_endpoint()
        else:
            fport = free_port()
            host, url = "127.0.0.1", f"http://127.0.0.1:{fport}"
        front.start(host, fport)
        yield Serving(
            base_url=f"{url}/v1",
            api_key=key,
            models=served,
            engine=engine,
            front=front,
            process=proc,
            upstream_url=upstream_url,
        )
    finally:
        if front is not None:
            front.stop()
        _stop(proc)
        pump.join(5)
        logf.close()


#: Per-request lines (uvicorn access log, vLLM request log): kept in the model server's log
#: file only, not shipped to the run's log once per request.
_PER_REQUEST = re.compile(
    rb'"(POST|GET) /(v1/|health|ow/)|\[Request received\]|Received request|Added request|Finished request'
)


def _pump(proc: subprocess.Popen, logf: Any) -> None:
    """Model server output → its log file and the run's log (our stdout)."""
    assert proc.stdout is not None
    out = sys.stdout.buffer
    for line in iter(proc.stdout.readline, b""):
        logf.write(line)
        logf.flush()
        if _PER_REQUEST.search(line):
            continue
        with contextlib.suppress(Exception):
            out.write(b"[model-server] " + line)
            out.flush()
