"""Large-file upload / download through a real server process, against a plain `cp` of the same file.

    python bench/bench_files.py                          # SQLite + local blobs, 256 MiB and 1 GiB
    python bench/bench_files.py --backend postgres       # PostgreSQL + S3 (moto, in memory): 256 MiB
    python bench/bench_files.py --backend postgres --sizes-mib 256 1024
    python bench/bench_files.py --sizes-mib 256 --out bench/results/files.json

For each size, on a fresh server: `POST /v1/files?purpose=result&filename=x` with the body streamed
from disk, then `GET /v1/files/{id}/content` streamed to disk. The client runs in its own process,
so its peak RSS (VmHWM) is the transfer's alone; the server's VmHWM is read before and after each
transfer. While a transfer runs, another thread pings `GET /health` to see whether the server's
event loop stays responsive. Big temporary files are deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from time import perf_counter

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, backend, machine, ratio, status_kb, summary_ms  # noqa: E402

CHUNK = 1 << 20
MiB = 1 << 20


# -- the client process ----------------------------------------------------------------------


def client_main(argv: list[str]) -> int:
    """`bench_files.py --client upload|download URL TOKEN PATH [FILE_ID]`: one transfer, then a
    JSON line with its duration and this process's peak RSS."""
    mode, url, token, path = argv[:4]
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600, trust_env=False) as c:
        if mode == "upload":

            def body():
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        yield chunk

            t0 = perf_counter()
            r = c.post(
                "/v1/files",
                params={"purpose": "result", "filename": "x"},
                content=body(),
                headers={"content-type": "application/octet-stream"},
            )
            dt = perf_counter() - t0
            r.raise_for_status()
            out = {"seconds": dt, "file": r.json()}
        else:
            file_id = argv[4]
            t0 = perf_counter()
            with c.stream("GET", f"/v1/files/{file_id}/content") as r, open(path, "wb") as f:
                r.raise_for_status()
                sha = r.headers.get("x-openweights-sha256")
                for chunk in r.iter_bytes(CHUNK):
                    f.write(chunk)
            dt = perf_counter() - t0
            out = {"seconds": dt, "sha256_header": sha}
    out["client_peak_rss_kib"] = status_kb("self", "VmHWM")
    print(json.dumps(out))
    return 0


def run_client(*args: str) -> dict:
    p = subprocess.run(
        [sys.executable, __file__, "--client", *args], capture_output=True, text=True, cwd=ROOT
    )
    if p.returncode != 0:
        raise RuntimeError(f"client {args[0]} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- helpers ---------------------------------------------------------------------------------


def make_file(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


class HealthProbe:
    """Ping `GET /health` every `interval_s` from a thread while a transfer runs."""

    def __init__(self, url: str, interval_s: float = 0.02) -> None:
        self.url, self.interval_s = url, interval_s
        self.lat: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120, trust_env=False) as c:
            while not self._stop.is_set():
                a = perf_counter()
                c.get("/health")
                self.lat.append(perf_counter() - a)
                self._stop.wait(self.interval_s)

    def __enter__(self) -> HealthProbe:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def result(self) -> dict | None:
        return summary_ms(self.lat) if self.lat else None


def timed_cp(src: Path, dst: Path) -> float:
    t0 = perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    dt = perf_counter() - t0
    dst.unlink()
    return dt


# -- the benchmark ---------------------------------------------------------------------------


def run_curl(mode: str, url: str, token: str, path: Path, file_id: str | None = None) -> dict:
    """The same transfer with curl (a C client: shows what the server can do when the Python
    client is not the limit). Peak RSS from GNU time."""
    auth = ["-H", f"Authorization: Bearer {token}"]
    if mode == "upload":
        cmd = [
            "curl",
            "-sS",
            "--fail",
            "-X",
            "POST",
            "-T",
            str(path),
            *auth,
            "-H",
            "content-type: application/octet-stream",
            f"{url}/v1/files?purpose=result&filename=x",
        ]
    else:
        cmd = ["curl", "-sS", "--fail", *auth, "-o", str(path), f"{url}/v1/files/{file_id}/content"]
    t0 = perf_counter()
    p = subprocess.run(
        ["/usr/bin/time", "-f", "maxrss_kib=%M", *cmd], capture_output=True, text=True
    )
    dt = perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"curl {mode} failed: {p.stderr[-2000:]}")
    rss = next(
        (int(x.split("=")[1]) for x in p.stderr.split() if x.startswith("maxrss_kib=")), None
    )
    out = {"seconds": dt, "client_peak_rss_kib": rss}
    if mode == "upload":
        out["file"] = json.loads(p.stdout)
    return out


def transfer(
    be, client: str, src: Path, dst: Path, size_mib: int, cp_s: float, want_sha: str
) -> dict:
    """On a fresh server (nothing deduplicated): upload `src`, download it to `dst`."""
    srv = be.start_server(f"files-{client}")
    try:
        token = srv.signup()
        rss0 = status_kb(srv.pid, "VmHWM") or 0
        with HealthProbe(srv.url) as probe:
            if client == "curl":
                up = run_curl("upload", srv.url, token, src)
            else:
                up = run_client("upload", srv.url, token, str(src))
        rss_up = status_kb(srv.pid, "VmHWM") or 0
        f = up["file"]
        with HealthProbe(srv.url) as probe_down:
            if client == "curl":
                down = run_curl("download", srv.url, token, dst, f["id"])
            else:
                down = run_client("download", srv.url, token, str(dst), f["id"])
        rss_down = status_kb(srv.pid, "VmHWM") or 0
    finally:
        srv.stop()
        shutil.rmtree(srv.home, ignore_errors=True)  # its blobs: another copy of the file
    got_size = dst.stat().st_size
    got_sha = sha256_of(dst)
    dst.unlink()

    def side(d: dict, rss_before: int, rss_after: int, probe_: HealthProbe) -> dict:
        return {
            "seconds": round(d["seconds"], 3),
            "mib_per_s": round(size_mib / d["seconds"], 1),
            "ratio_vs_cp_throughput": ratio(size_mib / d["seconds"], size_mib / cp_s),
            "client_peak_rss_mib": round((d["client_peak_rss_kib"] or 0) / 1024, 1),
            "server_peak_rss_mib_after": round(rss_after / 1024, 1),
            "server_peak_rss_growth_mib": round((rss_after - rss_before) / 1024, 1),
            "health_during": probe_.result(),
        }

    return {
        "server_peak_rss_mib_at_start": round(rss0 / 1024, 1),
        "upload": side(up, rss0, rss_up, probe),
        "download": side(down, rss_up, rss_down, probe_down),
        "verified": {
            "uploaded_bytes_ok": f["bytes"] == size_mib * MiB,
            "downloaded_bytes_ok": got_size == size_mib * MiB,
            "sha256_ok": got_sha == want_sha and down.get("sha256_header") in (None, want_sha),
        },
    }


def store_floor(be, src: Path, size_mib: int, sha: str) -> dict | None:
    """PostgreSQL + S3: the blob store's own speed, in-process, on the same moto endpoint,
    through the server's own `S3Blobs` (same boto3 transfer settings): what a transfer through
    the server cannot beat (the server puts the spooled upload with it, and streams downloads
    from it)."""
    if be.s3 is None:
        return None
    from openweights.store.blobs import S3Blobs

    saved = dict(os.environ)
    os.environ.update(be.s3.env())
    try:
        blobs = S3Blobs(be.s3.bucket, f"floor-{size_mib}", Path(tempfile.mkdtemp()))
        t0 = perf_counter()
        blobs.put_file(sha, src)
        up_s = perf_counter() - t0
        t0 = perf_counter()
        n = sum(len(c) for c in blobs.iter_bytes(sha))
        down_s = perf_counter() - t0
        assert n == size_mib * MiB
        blobs.client.delete_object(Bucket=be.s3.bucket, Key=blobs._key(sha))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {
        "put_file_mib_per_s": round(size_mib / up_s, 1),
        "iter_bytes_mib_per_s": round(size_mib / down_s, 1),
    }


def bench_size(be, size_mib: int, scratch: Path, clients: list[str]) -> dict:
    size = size_mib * MiB
    src, dst = scratch / f"src-{size_mib}", scratch / f"dst-{size_mib}"
    make_file(src, size)
    want_sha = sha256_of(src)
    res: dict = {"size_mib": size_mib}
    try:
        timed_cp(src, dst)  # warm-up: the source is in the page cache for every reader below
        cp_s = min(timed_cp(src, dst) for _ in range(2))
        res["cp"] = {"seconds": round(cp_s, 3), "mib_per_s": round(size_mib / cp_s, 1)}
        res["store_floor"] = store_floor(be, src, size_mib, want_sha)
        for client in clients:
            res[client] = transfer(be, client, src, dst, size_mib, cp_s, want_sha)
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    return res


def markdown(results: dict) -> str:
    lines = []
    for name, r in results.get("backends", {}).items():
        lines.append(f"### {name}\n")
        floors = any(s.get("store_floor") for s in r["sizes"])
        lines.append(
            "| size | client | `cp` MiB/s | upload MiB/s (÷ cp) | download MiB/s (÷ cp) | "
            + ("S3 store alone, in-process: put / get MiB/s (upload ÷ put) | " if floors else "")
            + "client peak RSS up / down MiB | "
            "server peak RSS start → after up → after down MiB | `/health` p50 / max ms during up · down |"
        )
        lines.append("|---:|---|---:|---:|---:|" + ("---:|" if floors else "") + "---:|---:|---:|")
        bad = []
        for s in r["sizes"]:
            for client in ("httpx", "curl"):
                if client not in s:
                    continue
                t = s[client]
                u, d = t["upload"], t["download"]
                hu, hd = u.get("health_during") or {}, d.get("health_during") or {}
                lines.append(
                    f"| {s['size_mib']} MiB | {client} | {s['cp']['mib_per_s']:,.0f} | "
                    f"{u['mib_per_s']:,.0f} ({u['ratio_vs_cp_throughput']:.2f}) | "
                    f"{d['mib_per_s']:,.0f} ({d['ratio_vs_cp_throughput']:.2f}) | "
                    + (
                        f"{fl['put_file_mib_per_s']:,.0f} / {fl['iter_bytes_mib_per_s']:,.0f} "
                        f"({u['mib_per_s'] / fl['put_file_mib_per_s']:.2f}) | "
                        if (fl := s.get("store_floor"))
                        else ""
                    )
                    + f"{u['client_peak_rss_mib']:.0f} / {d['client_peak_rss_mib']:.0f} | "
                    f"{t['server_peak_rss_mib_at_start']:.0f} → {u['server_peak_rss_mib_after']:.0f} → "
                    f"{d['server_peak_rss_mib_after']:.0f} | "
                    f"{hu.get('p50_ms', 0):.1f} / {hu.get('max_ms', 0):.0f} · {hd.get('p50_ms', 0):.1f} / {hd.get('max_ms', 0):.0f} |"
                )
                if not all(t["verified"].values()):
                    bad.append(f"{s['size_mib']} MiB {client}")
        lines.append("")
        lines.append(
            "All transfers verified (size and sha256)."
            if not bad
            else f"VERIFICATION FAILED: {bad}"
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        return client_main(argv[1:])
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="sqlite")
    ap.add_argument(
        "--sizes-mib",
        type=int,
        nargs="+",
        default=None,
        help="default: 256 1024 on SQLite; 256 on PostgreSQL + moto S3 (1 GiB there takes ~1.5 min)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "files.json"))
    ap.add_argument("--clients", nargs="+", choices=["httpx", "curl"], default=["httpx", "curl"])
    ap.add_argument(
        "--scratch", default=None, help="directory for the big temporary files (default: $TMPDIR)"
    )
    args = ap.parse_args(argv)

    out = Path(args.out)
    results: dict = {}
    if out.exists():
        try:
            results = json.loads(out.read_text())
        except (OSError, ValueError):
            results = {}
    results["machine"] = machine()
    results.setdefault("backends", {})
    names = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    for name in names:
        scratch = Path(tempfile.mkdtemp(prefix="ow-bench-files-", dir=args.scratch))
        t0 = perf_counter()
        try:
            with backend(name) as be:
                sizes = []
                for mib in args.sizes_mib or ([256, 1024] if name == "sqlite" else [256]):
                    print(
                        f"[{time.strftime('%H:%M:%S')}] {name}: {mib} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
                    sizes.append(bench_size(be, mib, scratch, args.clients))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        results["backends"][name] = {
            "sizes": sizes,
            "wall_s": round(perf_counter() - t0, 1),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
