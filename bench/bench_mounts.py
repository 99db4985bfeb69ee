"""A job's many mounted files: uploading N small files the server lacks, then again (none sent).

A real server process; the SDK's upload of a job's mounts (`ow.files._upload_paths`, what
`create` of a custom job calls) directly, optionally through a TCP proxy that delays every chunk
by `--delay-ms` each way (a remote server: this machine has no `tc netem`).

    python bench/bench_mounts.py [--backend sqlite|postgres] [--files 500] [--delay-ms 0 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import backend, machine  # noqa: E402


async def _pipe(reader, writer, delay_s: float) -> None:
    """Forwards reader → writer, each chunk `delay_s` after it arrived, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def out() -> None:
        while True:
            at, data = await queue.get()
            if data is None:
                writer.close()
                return
            wait = at + delay_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(out())
    while True:
        data = await reader.read(1 << 16)
        queue.put_nowait((loop.time(), data or None))
        if not data:
            break
    await sender


def latency_proxy(target_port: int, delay_s: float) -> int:
    """A TCP proxy to 127.0.0.1:target_port in a thread, `delay_s` each way; returns its port."""
    ready = threading.Event()
    box: dict = {}

    async def main() -> None:
        async def handle(cr, cw) -> None:
            sr, sw = await asyncio.open_connection("127.0.0.1", target_port)
            await asyncio.gather(
                _pipe(cr, sw, delay_s), _pipe(sr, cw, delay_s), return_exceptions=True
            )

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        box["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    ready.wait()
    return box["port"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--delay-ms", type=float, nargs="+", default=[0.0, 10.0])
    args = ap.parse_args()
    from openweights import OpenWeights
    from openweights.client import files
    from openweights.client.files import file_id_of_path

    concurrency = getattr(files, "UPLOAD_CONCURRENCY", 1)  # 1: a version that sent them in turn

    results: dict = {"machine": machine(), "backend": args.backend, "runs": []}
    with backend(args.backend) as b:
        srv = b.start_server("mounts")
        key = srv.signup()
        for delay_ms in args.delay_ms:
            d = Path(tempfile.mkdtemp(dir=b.workdir))
            paths = {}
            for i in range(args.files):  # distinct content per run: every file is missing
                p = d / f"m{i}.py"
                p.write_text(f"# {delay_ms} {i}\n" + "x = 1\n" * 50)
                paths[file_id_of_path("custom_job_file", p)] = p
            port = latency_proxy(srv.port, delay_ms / 1000) if delay_ms else srv.port
            ow = OpenWeights(base_url=f"http://127.0.0.1:{port}", api_key=key)
            t0 = time.perf_counter()
            ow.files._upload_paths(paths, purpose="custom_job_file")
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            ow.files._upload_paths(paths, purpose="custom_job_file")
            again = time.perf_counter() - t0
            row = {"delay_ms_each_way": delay_ms, "files": args.files,
                   "concurrency": concurrency, "first_s": first, "again_s": again}  # fmt: skip
            results["runs"].append(row)
            print(f"{args.files} files, {delay_ms:g} ms each way: first {first * 1e3:.0f} ms "
                  f"({first / args.files * 1e3:.2f} ms/file), again {again * 1e3:.0f} ms")  # fmt: skip
        srv.stop()
    out = Path(__file__).parent / "results" / f"mounts_{args.backend}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
