"""A local stand-in for RunPod's GraphQL API (`POST /graphql`), for the `runpod` provider's tests.

It parses queries with graphql-core and answers the fields the `runpod` SDK and our provider use:
`gpuTypes`, `podFindAndDeployOnDemand`, `deployCpuPod`, `myself { pods }`, `pod(input)`,
`podTerminate`, with RunPod's answer shapes: 401 for a bad key, 429 for the rate limit, GraphQL
`errors` (HTTP 200) for no capacity or a low balance. A pod that "boots" is a real `ow worker`
process with the pod's environment, registering the pod's GPUs as its hardware; `never_boot` pods
stay up and silent.

    double = RunPodDouble(api_key="rp-key").start()   # double.url -> RUNPOD_API_BASE_URL
    double.no_capacity.add("NVIDIA A100 80GB PCIe"); double.rate_limit_next = 2
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from graphql import parse
from graphql.language import ast

NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)
LOW_BALANCE = "Your account balance is too low to deploy this pod. Please add funds."
GPU_TYPES = {
    # id: (displayName, memoryInGb, hourly price per GPU)
    "NVIDIA RTX A4500": ("RTX A4500", 20, 0.25),
    "NVIDIA RTX A5000": ("RTX A5000", 24, 0.27),
    "NVIDIA L4": ("L4", 24, 0.43),
    "NVIDIA GeForce RTX 3090": ("RTX 3090", 24, 0.43),
    "NVIDIA A40": ("A40", 48, 0.44),
    "NVIDIA RTX A6000": ("RTX A6000", 48, 0.49),
    "NVIDIA A100 80GB PCIe": ("A100 80GB PCIe", 80, 1.39),
    "NVIDIA H100 80GB HBM3": ("H100 80GB HBM3", 80, 2.69),
    "NVIDIA H200": ("H200", 141, 3.59),
}


def _value(node: ast.ValueNode) -> Any:
    if isinstance(node, ast.ObjectValueNode):
        return {f.name.value: _value(f.value) for f in node.fields}
    if isinstance(node, ast.ListValueNode):
        return [_value(v) for v in node.values]
    if isinstance(node, ast.IntValueNode):
        return int(node.value)
    if isinstance(node, ast.FloatValueNode):
        return float(node.value)
    if isinstance(node, ast.BooleanValueNode):
        return node.value
    if isinstance(node, ast.NullValueNode):
        return None
    return node.value  # StringValue, EnumValue


@dataclass
class FakePod:
    id: str
    name: str
    image: str
    gpu_type_id: str | None
    gpu_count: int
    env: dict[str, str]
    cost_per_hr: float
    created_at: float
    desired: str = "RUNNING"
    booted: bool = False
    proc: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class RunPodDouble:
    api_key: str = "rp-test-key"
    workdir: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")))
    boot_workers: bool = True  # a booted pod runs a real worker process
    # failure knobs
    no_capacity: set[str] = field(default_factory=set)  # gpuTypeIds (or "cpu") with none free
    never_boot: set[str] = field(default_factory=set)  # these come up but never run a worker
    rate_limit_next: int = 0  # answer this many requests with 429
    fail_next: int = 0  # answer this many requests with 500
    low_balance: bool = False
    hang_s: float = 0.0  # sleep this long before answering (client timeouts)
    # sleep this long, then deploy anyway (a launch that times out at the client yet started)
    hang_deploy_s: float = 0.0
    # SSH: the port pods report, and where a pod's PUBLIC_KEY goes (a local sshd's
    # AuthorizedKeysFile), as the worker image's entrypoint does in a real pod
    ssh_port: int = 22022
    authorized_keys: Path | None = None
    # what happened
    pods: dict[str, FakePod] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # top-level field of every request
    created: list[FakePod] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> RunPodDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                status, payload, headers = double.handle(
                    self.path, self.headers.get("authorization", ""), body
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): as with the real API

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        for pod in list(self.pods.values()):
            self._kill(pod)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def running(self) -> list[FakePod]:
        return [p for p in self.pods.values() if p.desired == "RUNNING"]

    def crash(self, pod_id: str) -> None:
        """The pod's machine dies: its process is killed, the pod shows EXITED."""
        pod = self.pods[pod_id]
        self._kill(pod)
        pod.desired = "EXITED"

    def delete(self, pod_id: str) -> None:
        """Someone terminates the pod by hand (RunPod's console): it is gone from the listing."""
        pod = self.pods[pod_id]
        self._kill(pod)
        pod.desired = "TERMINATED"

    # -- protocol -------------------------------------------------------------------------------
    def handle(self, path: str, auth: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        if self.hang_s:
            time.sleep(self.hang_s)
        if path.rstrip("/") != "/graphql":
            return 404, {"error": "not found"}, {}
        if auth != f"Bearer {self.api_key}":
            return 401, {"error": "Unauthorized"}, {}
        with self._lock:
            if self.rate_limit_next > 0:
                self.rate_limit_next -= 1
                self.requests.append("429")
                return 429, {"error": "Too many requests"}, {"retry-after": "1"}
            if self.fail_next > 0:
                self.fail_next -= 1
                self.requests.append("500")
                return 500, {"error": "Internal server error"}, {}
        try:
            doc = parse(json.loads(body)["query"])
        except Exception as e:  # RunPod answers a syntax error as a GraphQL error
            return 400, {"errors": [{"message": f"Syntax Error: {e}"}]}, {}
        op = doc.definitions[0]
        assert isinstance(op, ast.OperationDefinitionNode)
        sel = op.selection_set.selections[0]
        assert isinstance(sel, ast.FieldNode)
        name = sel.name.value
        args = {a.name.value: _value(a.value) for a in sel.arguments}
        if self.hang_deploy_s and name in ("podFindAndDeployOnDemand", "deployCpuPod"):
            time.sleep(self.hang_deploy_s)
        with self._lock:
            self.requests.append(name)
            try:
                data = getattr(self, f"_q_{name}")(args.get("input") or {})
            except _GraphQLError as e:
                return 200, {"errors": [{"message": str(e), "path": [name]}], "data": None}, {}
        return 200, {"data": {name: data}}, {}

    def _q_gpuTypes(self, inp: dict) -> list[dict]:  # noqa: N802
        ids = [inp["id"]] if inp.get("id") else list(GPU_TYPES)
        return [
            {"id": i, "displayName": GPU_TYPES[i][0], "memoryInGb": GPU_TYPES[i][1]}
            for i in ids
            if i in GPU_TYPES
        ]

    def _q_myself(self, inp: dict) -> dict:
        return {
            "pods": [self._pod_json(p) for p in self.pods.values() if p.desired != "TERMINATED"]
        }

    def _q_pod(self, inp: dict) -> dict | None:
        pod = self.pods.get(inp.get("podId", ""))
        return None if pod is None or pod.desired == "TERMINATED" else self._pod_json(pod)

    def _q_podTerminate(self, inp: dict) -> None:  # noqa: N802
        pod = self.pods.get(inp.get("podId", ""))
        if pod is None:
            raise _GraphQLError("Pod not found")
        self._kill(pod)
        pod.desired = "TERMINATED"
        return None

    def _q_podFindAndDeployOnDemand(self, inp: dict) -> dict:  # noqa: N802
        gpu = inp.get("gpuTypeId")
        if gpu not in GPU_TYPES:
            raise _GraphQLError(f"Invalid GPU type id {gpu}")
        return self._deploy(inp, gpu, int(inp.get("gpuCount") or 1))

    def _q_deployCpuPod(self, inp: dict) -> dict:  # noqa: N802
        return self._deploy(inp, None, 0)

    def _deploy(self, inp: dict, gpu: str | None, count: int) -> dict:
        if self.low_balance:
            raise _GraphQLError(LOW_BALANCE)
        if (gpu or "cpu") in self.no_capacity:
            raise _GraphQLError(NO_CAPACITY)
        env = {e["key"]: e["value"] for e in inp.get("env") or []}
        price = GPU_TYPES[gpu][2] * count if gpu else 0.06
        pod = FakePod(
            id=uuid.uuid4().hex[:14],
            name=inp.get("name") or "",
            image=inp.get("imageName") or "",
            gpu_type_id=gpu,
            gpu_count=count,
            env=env,
            cost_per_hr=round(price, 4),
            created_at=time.time(),
        )
        self.pods[pod.id] = pod
        self.created.append(pod)
        if self.authorized_keys is not None and env.get("PUBLIC_KEY"):
            with open(self.authorized_keys, "a") as f:
                f.write(env["PUBLIC_KEY"].strip() + "\n")
        if (gpu or "cpu") not in self.never_boot:
            self._boot(pod)
        return {
            "id": pod.id,
            "imageName": pod.image,
            "env": [],
            "machineId": "m-" + pod.id,
            "machine": {"podHostId": pod.id + "-host"},
        }

    def _pod_json(self, pod: FakePod) -> dict:
        runtime = None
        if pod.booted and pod.desired == "RUNNING":
            runtime = {
                "uptimeInSeconds": int(time.time() - pod.created_at),
                "ports": [
                    {
                        "ip": "127.0.0.1",
                        "isIpPublic": True,
                        "privatePort": 22,
                        "publicPort": self.ssh_port,
                        "type": "tcp",
                    }
                ],
            }
        return {
            "id": pod.id,
            "name": pod.name,
            "desiredStatus": pod.desired,
            "imageName": pod.image,
            "costPerHr": pod.cost_per_hr,
            "gpuCount": pod.gpu_count,
            "lastStatusChange": "",
            "machine": {
                "gpuDisplayName": GPU_TYPES[pod.gpu_type_id][0] if pod.gpu_type_id else None
            },
            "runtime": runtime,
        }

    # -- pods as processes ----------------------------------------------------------------------
    def _boot(self, pod: FakePod) -> None:
        pod.booted = True
        if not self.boot_workers:
            return
        home = self.workdir / f"pod-{pod.id}"
        home.mkdir(parents=True, exist_ok=True)
        if pod.gpu_type_id:
            display, mem, _ = GPU_TYPES[pod.gpu_type_id]
            hardware = {"gpu_name": display, "count": pod.gpu_count, "memory_gb": mem}
        else:
            hardware = {"gpu_name": None, "count": 0, "memory_gb": 0}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENWEIGHTS_", "RUNPOD_"))}
        env.update(pod.env)
        env.update(
            OPENWEIGHTS_HOME=str(home),
            OW_POD_HARDWARE=json.dumps(hardware),
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
        )
        pod.log = home / "pod.log"
        root = Path(__file__).resolve().parent.parent
        pod.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.runpod_double"],
            env=env,
            cwd=root,
            stdout=open(pod.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _kill(self, pod: FakePod) -> None:
        proc = pod.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a terminated pod's machine is gone at once
        except ProcessLookupError:
            pass
        proc.wait(10)


class _GraphQLError(Exception):
    pass


def _pod_main() -> int:
    """Inside a fake pod: what the worker image's entrypoint does (`ow worker`), with the pod's
    GPUs as the registered hardware (this machine has none)."""
    import logging

    from openweights.types import Hardware
    from openweights.worker._worker import Worker
    from openweights.worker.hardware import gpu_short_name

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    hw = json.loads(os.environ["OW_POD_HARDWARE"])
    if hw["gpu_name"]:
        short = gpu_short_name(hw["gpu_name"])
        hardware = Hardware(
            gpu_type=short,
            gpu_count=hw["count"],
            vram_gb=float(hw["memory_gb"] * hw["count"]),
            hardware_type=f"{hw['count']}x {short}",
        )
    else:
        hardware = Hardware()
    return Worker(
        url=os.environ["OPENWEIGHTS_URL"],
        token=os.environ["OPENWEIGHTS_API_KEY"],
        name=os.environ.get("OW_WORKER_NAME"),
        docker_image=os.environ.get("OW_DOCKER_IMAGE") or None,
        provider=os.environ.get("OW_PROVIDER", "runpod"),
        hardware=hardware,
    ).run()


if __name__ == "__main__":
    sys.exit(_pod_main())
