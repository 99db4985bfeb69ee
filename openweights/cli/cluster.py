"""`ow cluster`, `ow deploy`, `ow manage`, `ow exec`, `ow ssh`: GPUs for the queue and for you."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from openweights.cli import _common as c

PROVIDERS = ("runpod", "local")
DEFAULT_CLUSTER_IMAGE = "ghcr.io/openweights/ow-cluster:0.1"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster",
        help="Run the cluster manager here: start pods for queued jobs, stop idle ones.",
        description="Run the cluster manager in the foreground for the org of OPENWEIGHTS_API_KEY. "
        "It watches the queue (long-poll, no polling delay), starts the cheapest pod that fits "
        "each waiting job (catalog in docs/cluster.md), lets workers take further jobs, stops "
        "idle ones and replaces dead ones. RUNPOD_API_KEY comes from the org's secrets (`ow env "
        "import`), else from the env file. Limits: flags, else the org's secrets OW_MAX_WORKERS, "
        "OW_MAX_SPEND_PER_HOUR, OW_IDLE_S. Pods keep running when the manager stops; the next "
        "manager adopts them.",
    )
    p.add_argument("--env-file", metavar="FILE", help="Load KEY=VALUE lines into the environment.")
    p.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="runpod",
        help="Where pods run (default: %(default)s).",
    )
    p.add_argument("--max-workers", type=int, metavar="N", help="Pods at once (default 8).")
    p.add_argument(
        "--max-spend-per-hour",
        type=float,
        metavar="USD",
        help="Cap on the hourly price of all pods.",
    )
    p.add_argument(
        "--idle-s", type=float, metavar="S", help="Stop a worker idle this long (default 300)."
    )
    p.add_argument(
        "--boot-deadline-s",
        type=float,
        metavar="S",
        help="Replace a pod whose worker has not registered by then (default 900).",
    )
    p.add_argument(
        "--gpu-image",
        metavar="IMAGE",
        help="Worker image for GPU pods of jobs without docker_image.",
    )
    p.add_argument("--cpu-image", metavar="IMAGE", help="Worker image for CPU pods.")
    p.add_argument(
        "--pod-server-url",
        metavar="URL",
        help="The server URL as pods reach it (default: OPENWEIGHTS_URL).",
    )
    p.add_argument(
        "--prices",
        metavar="FILE",
        help='JSON {"H100": 2.39, …}: USD per GPU-hour overriding the catalog.',
    )
    p.add_argument(
        "--lease-ttl-s",
        type=float,
        metavar="S",
        help="Manager lease; a standby takes over this long after a manager dies (default 30).",
    )
    p.add_argument(
        "--local-max-pods",
        type=int,
        default=1,
        metavar="N",
        help="local provider: workers at once (default 1).",
    )
    p.add_argument(
        "--any-hardware",
        action="store_true",
        help="local provider: workers take every job whatever it requires.",
    )
    p.add_argument(
        "--once", action="store_true", help="Act once, print what was done as JSON, exit."
    )
    p.add_argument(
        "--terminate-pods", action="store_true", help="Terminate every pod of this org and exit."
    )
    p.add_argument(
        "--supervise",
        action="store_true",
        help="Server operator: run a manager for every org that ran `ow manage start` (needs the "
        "server's database: OPENWEIGHTS_DATABASE_URL or OPENWEIGHTS_HOME, and its secret key).",
    )
    p.add_argument(
        "--scan-s",
        type=float,
        default=15.0,
        metavar="S",
        help="--supervise: how often to look for managed orgs (default: %(default)s).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser(
        "deploy",
        help="Run the cluster manager on a RunPod CPU pod.",
        description="Start the cluster manager (`ow cluster`) on a RunPod CPU pod, so it runs "
        "without this machine. The pod gets OPENWEIGHTS_URL and a new API key named "
        "'cluster manager (deploy)' (revoke it to stop the pod acting); RUNPOD_API_KEY stays in "
        "the org's secrets. OPENWEIGHTS_URL must be reachable from RunPod.",
    )
    p.add_argument("--env-file", metavar="FILE", help="Load KEY=VALUE lines into the environment.")
    p.add_argument(
        "--image", default=DEFAULT_CLUSTER_IMAGE, help="Manager image (default: %(default)s)."
    )
    p.add_argument("--stop", metavar="POD_ID", help="Terminate a deployed manager pod instead.")
    p.add_argument(
        "--cluster-args",
        default="",
        metavar="ARGS",
        help="Extra `ow cluster` flags for the pod, e.g. '--max-workers 4'.",
    )
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser(
        "manage",
        help="Control the managed cluster (the server operator runs the manager for you).",
        description="start: mark the org as managed (secret OW_MANAGED=true) after checking its "
        "secrets hold RUNPOD_API_KEY; the server operator's supervisor then runs a manager for it. "
        "stop: unmark it. status: what the cluster does now (manager, pods, queue, cost).",
    )
    p.add_argument("action", choices=("start", "stop", "status"))
    p.set_defaults(func=cmd_manage)

    p = sub.add_parser(
        "exec",
        help="Run a command on a GPU worker with the current directory synced.",
        description="Upload the current directory (what .gitignore keeps; never .git, virtual "
        "environments or caches), run CMD there as a job on a worker that fits, stream its "
        "output live, and write the files it created or changed back here. Exits with the "
        "command's exit code.",
    )
    p.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="The command (one argument: run by the shell).",
    )
    p.add_argument(
        "--requires-vram-gb",
        type=float,
        default=24,
        metavar="GB",
        help="GPU memory needed (default: %(default)s).",
    )
    p.add_argument(
        "--allowed-hardware", action="append", metavar="HW", help='e.g. "1x H100" (repeatable).'
    )
    p.add_argument("--image", metavar="IMAGE", help="Worker image (docker_image of the job).")
    p.add_argument("--no-sync-back", action="store_true", help="Do not write changed files back.")
    p.add_argument("--detach", action="store_true", help="Submit, print the job id, return.")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser(
        "ssh",
        help="Start a worker pod and open a shell there, with live sync of this directory.",
        description="local: a shell (or CMD) in a directory on this machine kept in sync with the "
        "current one, files changed there brought back on exit. runpod: a pod with SSH; the "
        "directory is rsynced to it and kept in sync while the shell runs; terminated on exit "
        "unless --keep.",
    )
    p.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="Run this instead of an interactive shell.",
    )
    p.add_argument("--provider", choices=PROVIDERS, default="runpod")
    p.add_argument(
        "--gpu", default="1x A100", metavar="HW", help="runpod: hardware (default: %(default)s)."
    )
    p.add_argument(
        "--image",
        default=None,
        metavar="IMAGE",
        help="runpod: image (default: the GPU worker image).",
    )
    p.add_argument(
        "--key-path", default="~/.ssh/id_ed25519", help="SSH private key; its .pub goes to the pod."
    )
    p.add_argument(
        "--remote-dir", default="/workspace/code", help="runpod: where the directory goes."
    )
    p.add_argument("--keep", action="store_true", help="runpod: leave the pod running on exit.")
    p.add_argument("--no-sync", action="store_true", help="Do not sync the current directory.")
    p.add_argument("--env-file", metavar="FILE", help="Load KEY=VALUE lines into the environment.")
    p.set_defaults(func=cmd_ssh)


# ---------------------------------------------------------------- helpers


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cluster_secrets(ow: Any) -> dict[str, str]:
    from openweights.types.cluster import CLUSTER_SECRET_NAMES

    body = {"names": list(CLUSTER_SECRET_NAMES)}
    return ow._http.request("POST", "/v1/cluster/secrets", json=body).json()["values"]


def _runpod_key(ow: Any, secrets: dict[str, str] | None = None) -> str:
    secrets = _cluster_secrets(ow) if secrets is None else secrets
    key = secrets.get("RUNPOD_API_KEY") or os.environ.get("RUNPOD_API_KEY")
    if not key:
        raise c.CLIError(
            "RUNPOD_API_KEY is not set: add it to the org's secrets (`ow env import FILE`) or to "
            "the env file (--env-file)."
        )
    return key


def _load_env(args: argparse.Namespace) -> None:
    args.env_values = c.load_env_file(args.env_file) if getattr(args, "env_file", None) else {}


# ---------------------------------------------------------------- cluster


_FLAG_FIELDS = (
    ("max_workers", "max_workers"),
    ("max_spend_per_hour", "max_spend_per_hour"),
    ("idle_s", "idle_s"),
    ("boot_deadline_s", "boot_deadline_s"),
    ("gpu_image", "gpu_image"),
    ("cpu_image", "cpu_image"),
    ("pod_server_url", "server_url"),
    ("lease_ttl_s", "lease_ttl_s"),
)


def _apply_flags(args: argparse.Namespace, config: Any) -> Any:
    """Flags given on the command line win over the org's secrets and the defaults."""
    from dataclasses import replace

    for flag, field in _FLAG_FIELDS:
        value = getattr(args, flag, None)
        if value is not None:
            config = replace(config, **{field: value})
    return config


def build_manager(args: argparse.Namespace, ow: Any):
    """The manager `ow cluster` runs, from flags, the org's secrets and the environment."""
    from dataclasses import replace

    from openweights._settings import Settings
    from openweights.cluster.catalog import DEFAULT_CATALOG
    from openweights.cluster.manager import ClusterManager, ManagerConfig, config_from_secrets

    secrets = _cluster_secrets(ow)
    try:
        config = config_from_secrets(secrets, ManagerConfig())
    except ValueError as e:
        raise c.CLIError(str(e)) from None
    config = _apply_flags(args, config)
    home = Settings().home
    catalog = DEFAULT_CATALOG
    if getattr(args, "prices", None):
        try:
            catalog = catalog.with_prices(json.loads(Path(args.prices).read_text()))
        except (OSError, ValueError) as e:
            raise c.CLIError(f"--prices {args.prices}: {e}") from None
    if args.provider == "local":
        from openweights.cluster.providers.local import LocalProvider

        provider = LocalProvider(
            home / "cluster" / "local-pods",
            max_pods=args.local_max_pods,
            exclude=list(getattr(args, "env_values", {})),
        )
        if args.any_hardware:
            config = replace(config, pod_env={**config.pod_env, "OW_ANY_HARDWARE": "1"})
    else:
        from openweights.cluster.providers.runpod import RunPodProvider

        url = config.server_url or ow.base_url
        if "127.0.0.1" in url or "localhost" in url:
            _err(
                f"warning: pods reach the server at {url}, which RunPod cannot reach; "
                "pass --pod-server-url with a public URL"
            )
        provider = RunPodProvider(_runpod_key(ow, secrets), catalog=catalog)
    return ClusterManager(
        url=ow.base_url, api_key=ow.api_key, provider=provider, config=config, catalog=catalog
    )


def cmd_cluster(args: argparse.Namespace) -> int:
    import logging

    _load_env(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.supervise:
        return _supervise(args)
    ow = c.make_client()
    manager = build_manager(args, ow)
    if args.terminate_pods:
        for line in manager.terminate_all("ow cluster --terminate-pods"):
            print(line)
        return 0
    if args.once:
        if not manager.renew_lease():
            raise c.CLIError("another manager holds this org's lease; not acting")
        try:
            manager.step()
        finally:
            manager.release_lease()
        r = manager.last_report
        print(json.dumps(r.__dict__, indent=2))
        return 0

    def on_signal(signum, frame):
        manager.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _err(
        f"cluster manager for org {manager.org_id} on {manager.provider.name} "
        f"(max {manager.config.max_workers} workers, idle {manager.config.idle_s:.0f}s); Ctrl-C stops it"
    )
    manager.run()
    return 0


def _supervise(args: argparse.Namespace) -> int:

    from openweights._settings import Settings
    from openweights.cluster.manager import ManagerConfig
    from openweights.cluster.supervisor import Supervisor

    settings = Settings()
    if not settings.url:
        raise c.CLIError("--supervise needs OPENWEIGHTS_URL: the server the managers talk to")
    if args.provider != "runpod":
        raise c.CLIError("--supervise runs RunPod managers (--provider runpod)")
    config = ManagerConfig()
    config = _apply_flags(args, config)
    sup = Supervisor(server_url=settings.url, settings=settings, config=config, scan_s=args.scan_s)

    def on_signal(signum, frame):
        sup.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _err("supervising managed orgs (`ow manage start`); Ctrl-C stops")
    sup.run()
    return 0


# ---------------------------------------------------------------- deploy


def cmd_deploy(args: argparse.Namespace) -> int:
    from openweights.cluster.catalog import DEFAULT_CATALOG
    from openweights.cluster.providers.base import PodSpec, ProviderError
    from openweights.cluster.providers.runpod import RunPodProvider

    _load_env(args)
    ow = c.make_client()
    provider = RunPodProvider(_runpod_key(ow))
    if args.stop:
        provider.terminate(args.stop)
        print(f"terminated {args.stop}")
        return 0
    if "127.0.0.1" in ow.base_url or "localhost" in ow.base_url:
        _err(
            f"warning: {ow.base_url} is not reachable from RunPod; set OPENWEIGHTS_URL to a public URL"
        )
    tag = ow.me().org.id.rsplit("-", 1)[-1][-8:]
    name = f"owcm-{tag}-{int(time.time())}-{uuid.uuid4().hex[:6]}"  # not `ow-`: not a worker pod
    token = ow.tokens.create(name="cluster manager (deploy)", kind="user")
    env = {
        "OPENWEIGHTS_URL": ow.base_url,
        "OPENWEIGHTS_API_KEY": token.token,
        "OW_CLUSTER_ARGS": args.cluster_args,
    }
    cpu = DEFAULT_CATALOG.cpu
    assert cpu is not None
    try:
        pod = provider.launch(PodSpec(name=name, image=args.image, offer=cpu, env=env, disk_gb=20))
    except ProviderError as e:
        ow.tokens.revoke(token.id)
        raise c.CLIError(f"RunPod did not start the manager pod: {e}") from None
    print(pod.id)
    _err(
        f"cluster manager pod {pod.id} ({name}) starting with {args.image}; "
        f"stop it with `ow deploy --stop {pod.id}` (and revoke token {token.id})"
    )
    return 0


# ---------------------------------------------------------------- manage


def cmd_manage(args: argparse.Namespace) -> int:
    ow = c.make_client()
    names = {s.name for s in ow.secrets.list()}
    if args.action == "start":
        missing = [n for n in ("RUNPOD_API_KEY",) if n not in names]
        if missing:
            raise c.CLIError(
                f"the org's secrets lack {', '.join(missing)}: `ow env import FILE` first "
                "(see .env.worker.example)"
            )
        ow._http.request("PUT", "/v1/secrets/OW_MANAGED", json={"value": "true"})
        print("managed: the server's supervisor runs a cluster manager for this org")
        return 0
    if args.action == "stop":
        if "OW_MANAGED" in names:
            ow._http.request("DELETE", "/v1/secrets/OW_MANAGED")
        print(
            "unmanaged: no manager is started for this org (running pods stop when idle only "
            "while some manager runs; `ow cluster --terminate-pods` stops them now)"
        )
        return 0
    state = ow._http.request("POST", "/v1/cluster/state", json={"wait_s": 0}).json()
    costs = ow._http.request(
        "GET", "/v1/cluster/costs", params={"since": time.time() - 86400}
    ).json()
    pods = [w for w in state["workers"] if w["name"].startswith("ow-") and w["status"] == "active"]
    print(f"managed:        {'yes' if 'OW_MANAGED' in names else 'no'}")
    print(f"pending jobs:   {state['pending_total']}")
    print(f"active workers: {len(pods)} from pods, {len(state['workers']) - len(pods)} other")
    running = ow._http.request("GET", "/v1/cluster/pods", params={"running": "true"}).json()
    print(f"pods running:   {len(running['data'])} ({running['billed_usd']:.2f} USD billed so far)")
    print(
        f"cost, last 24h: {costs['total_usd']:.2f} USD of job runs, "
        f"{costs['billed_usd']:.2f} USD of pod time (boot and idle included)"
    )
    return 0


# ---------------------------------------------------------------- exec


def _upload_tree(ow: Any, root: Path) -> dict[str, str]:
    from openweights.client.custom_job import MOUNT_PURPOSE
    from openweights.client.files import file_id_of_path
    from openweights.cluster._sync import select_files

    files = select_files(root)
    ids = {rel: file_id_of_path(MOUNT_PURPOSE, p) for rel, p in files.items()}
    missing = set(ow.files.check(sorted(set(ids.values()))))
    sent: set[str] = set()
    for rel, fid in ids.items():
        if fid in missing and fid not in sent:
            ow.files.upload(files[rel], purpose=MOUNT_PURPOSE)
            sent.add(fid)
    return ids


EXEC_WRAPPER = (
    'PY="$(command -v python || command -v python3)"; '
    '"$PY" -m openweights.cluster._sync snapshot && {{ {cmd}\n}}; rc=$?; '
    '"$PY" -m openweights.cluster._sync collect; exit $rc'
)


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = [a for a in args.cmd if a != "--"] if args.cmd else []
    if not cmd:
        raise c.CLIError("give a command: `ow exec python train.py`")
    command = cmd[0] if len(cmd) == 1 else shlex.join(cmd)
    ow = c.make_client()
    root = Path.cwd()
    mounted = _upload_tree(ow, root)
    body: dict[str, Any] = {
        "type": "exec",
        "id_prefix": "execjob",
        "script": EXEC_WRAPPER.format(cmd=command),
        "params": {"validated_params": {"cmd": command}, "mounted_files": mounted},
        "requires_vram_gb": args.requires_vram_gb,
        "allowed_hardware": args.allowed_hardware,
        "docker_image": args.image,
        "job_id_suffix": f"{int(time.time())}-{uuid.uuid4().hex[:6]}",  # every exec runs anew
    }
    est = ow._http.request(
        "POST",
        "/v1/cluster/estimate",
        json={k: body[k] for k in ("requires_vram_gb", "allowed_hardware", "docker_image")},
    ).json()
    _err(f"[ow exec] {est['message']}")
    job = ow._http.request("POST", "/v1/jobs", json=body).json()
    _err(f"[ow exec] job {job['id']}: {len(mounted)} file(s) synced")
    if args.detach:
        print(job["id"])
        return 0
    from openweights.cli.jobs import cmd_logs

    cmd_logs(argparse.Namespace(job_id=job["id"], run_id=None, follow=True))
    final = ow.jobs.wait(job["id"])
    runs = ow.runs.list(job_id=job["id"])
    if not args.no_sync_back and runs:
        back = _bring_back(ow, runs[-1].id, root)
        if back:
            _err(f"[ow exec] wrote back {len(back)} file(s): {', '.join(back[:10])}")
    if final.status == "completed":
        return 0
    _err(f"[ow exec] job {final.id} {final.status}: {final.error or ''}".rstrip(": "))
    code = runs[-1].exit_code if runs else None
    return code if isinstance(code, int) and code > 0 else 1


def _bring_back(ow: Any, run_id: int, root: Path) -> list[str]:
    events = ow._http.request("GET", "/v1/events", params={"run_id": run_id, "limit": 10000}).json()
    out = []
    for e in events["data"]:
        path, fid = e["data"].get("path"), e["data"].get("file")
        if not (isinstance(path, str) and fid and path.startswith("uploads/")):
            continue
        rel = Path(path[len("uploads/") :])
        if rel.is_absolute() or ".." in rel.parts:
            continue
        ow.files.download(fid, root / rel)
        out.append(rel.as_posix())
    return out


# ---------------------------------------------------------------- ssh


def cmd_ssh(args: argparse.Namespace) -> int:
    _load_env(args)
    cmd = [a for a in args.cmd if a != "--"] if args.cmd else []
    if args.provider == "local":
        return _ssh_local(args, cmd)
    return _ssh_runpod(args, cmd)


class _LiveSync:
    """Copy new and changed files from `src` to `dst` while a shell runs (once a second)."""

    def __init__(self, src: Path, dst: Path) -> None:
        import threading

        self.src, self.dst = src, dst
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def sync_once(self) -> None:
        import shutil

        from openweights.cluster._sync import select_files

        for rel, p in select_files(self.src).items():
            try:
                mtime = p.stat().st_mtime
            except OSError:
                continue
            if self.seen.get(rel) != mtime:
                dest = self.dst / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dest)
                self.seen[rel] = mtime

    def _loop(self) -> None:
        while not self.stop.wait(1.0):  # a file watcher's interval: nothing to be woken by
            try:
                self.sync_once()
            except OSError:
                pass

    def __enter__(self) -> _LiveSync:
        self.sync_once()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)


def _ssh_local(args: argparse.Namespace, cmd: list[str]) -> int:
    import shutil
    import subprocess

    from openweights._settings import Settings
    from openweights.cluster import _sync

    root = Path.cwd()
    remote = Settings().home / "ssh" / f"{root.name}-{uuid.uuid4().hex[:6]}"
    remote.mkdir(parents=True)
    _err(f"[ow ssh] local shell in {remote} (synced with {root})")
    env = {k: v for k, v in os.environ.items()}
    with _LiveSync(root, remote) if not args.no_sync else _Nothing():
        _sync.snapshot(remote)
        shell = cmd if cmd else [os.environ.get("SHELL", "/bin/bash"), "-i"]
        if len(shell) == 1 and " " in shell[0]:
            shell = ["/bin/sh", "-c", shell[0]]
        rc = subprocess.call(shell, cwd=remote, env=env)
    if not args.no_sync:
        changed = _sync.collect(remote)
        for rel in changed:
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(remote / rel, dest)
        if changed:
            _err(f"[ow ssh] brought back {len(changed)} file(s): {', '.join(changed[:10])}")
    shutil.rmtree(remote, ignore_errors=True)
    return rc


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _ssh_runpod(args: argparse.Namespace, cmd: list[str]) -> int:
    import shutil
    import subprocess

    from openweights._settings import Settings
    from openweights.cluster._sync import SKIP_DIRS
    from openweights.cluster.catalog import DEFAULT_CATALOG
    from openweights.cluster.manager import DEFAULT_GPU_IMAGE
    from openweights.cluster.providers.base import PodSpec
    from openweights.cluster.providers.runpod import RunPodProvider

    key = Path(os.path.expanduser(args.key_path))
    pub = key.with_suffix(key.suffix + ".pub")
    if not pub.exists():
        raise c.CLIError(
            f"no public key at {pub}: create one with `ssh-keygen -t ed25519 -f {key}`"
        )
    for tool in ("ssh", "rsync"):
        if shutil.which(tool) is None:
            raise c.CLIError(f"`ow ssh` needs {tool} on this machine")
    offer = DEFAULT_CATALOG.offer(args.gpu)
    if offer is None:
        raise c.CLIError(f"--gpu {args.gpu!r}: not in the catalog (e.g. '1x A100')")
    ow = c.make_client()
    provider = RunPodProvider(_runpod_key(ow))
    name = f"owssh-{int(time.time())}-{uuid.uuid4().hex[:6]}"  # not `ow-`: the manager leaves it
    env = {"PUBLIC_KEY": pub.read_text().strip(), "OW_DEV": "true"}
    pod = provider.launch(PodSpec(name, args.image or DEFAULT_GPU_IMAGE, offer, env))
    _err(f"[ow ssh] pod {pod.id} ({offer.hardware_type}) starting…")
    try:
        deadline = time.monotonic() + 900
        while True:
            now = provider.status(pod.id)
            if now is not None and now.detail.get("ssh_host"):
                break
            if time.monotonic() > deadline:
                raise c.CLIError(f"pod {pod.id} got no SSH port within 15 min")
            time.sleep(5)  # the provider has no push for this: its status is polled
        host, port = now.detail["ssh_host"], now.detail["ssh_port"]
        # Pods' host keys are new each time and RunPod reuses ip:port pairs: keep them out of
        # the user's known_hosts (a reused pair would be refused there as a changed key).
        known = Settings().home / "ssh" / "known_hosts"
        known.parent.mkdir(parents=True, exist_ok=True)
        ssh = [
            "ssh",
            "-i",
            str(key),
            "-p",
            port,
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            f"UserKnownHostsFile={known}",
            f"root@{host}",
        ]
        if not args.no_sync:
            rsync = [
                "rsync",
                "-az",
                "--exclude-from=-",
                "-e",
                shlex.join(ssh[:-1]),
                "./",
                f"root@{host}:{args.remote_dir}/",
            ]
            excludes = "\n".join(sorted(SKIP_DIRS)).encode()
            subprocess.run(ssh + [f"mkdir -p {shlex.quote(args.remote_dir)}"], check=False)
            subprocess.run(rsync, input=excludes, check=False)
        # one argument is a command line (as with `ow ssh --provider local`), more are argv
        line = (cmd[0] if len(cmd) == 1 else shlex.join(cmd)) if cmd else "exec bash -l"
        remote = f"cd {shlex.quote(args.remote_dir)} && {line}"
        if args.no_sync:
            return subprocess.call(ssh + ["-t", remote])
        import threading

        stop = threading.Event()

        def keep_syncing() -> None:
            # local edits reach the pod while the shell runs (rsync sends only what changed)
            while not stop.wait(2.0):
                subprocess.run(rsync, input=excludes, check=False, capture_output=True)

        syncer = threading.Thread(target=keep_syncing, daemon=True)
        syncer.start()
        try:
            return subprocess.call(ssh + ["-t", remote])
        finally:
            stop.set()
            syncer.join(10)
    finally:
        if not args.keep:
            provider.terminate(pod.id)
            _err(f"[ow ssh] terminated pod {pod.id}")
