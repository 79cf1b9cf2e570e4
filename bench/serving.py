"""Benchmark of the model service: our TF Serving REST service against `mlflow models serve` and the ceiling.

Needs the embedded-default champion (`make run`). In one run, on this machine:

- `python -m serving` (the champion from the registry), batching on
  (`serve.batch_timeout_ms` as configured, unless `--batch-timeout-ms`) and off
  (timeout 0), each a fresh process;
- `mlflow models serve -m models:/<name>@champion --env-manager local`, the
  peer a user would otherwise pick (its input is the decoded pixels, sent as
  JSON `instances`, since the MLflow model takes the Keras model's float input);
- the ceiling: the same champion called in-process (`predict_on_batch`) on the
  same decoded images in batches of `serve.max_batch_size`, no HTTP;
- the loop's cost: batching on with the prediction log off (`--log-sample 0`)
  against the default (log on, images stored) at concurrency 32; and, with a
  `challenger` (the bench points the alias at the newest other version for
  the run and puts it back after), shadow scoring at 0.5 against 0 at
  concurrency 1 and 32. Every service here logs into a scratch folder and cuts
  no landing batches.

The load: test-split images, one per request, as b64 PNG (TF Serving's row
format) for our service, at concurrency 1, 8 and 32, a fixed number of
requests each after a warm-up; an asyncio client (aiohttp) on the same
machine, so client and server share the cores (say so when you quote it).
Prints p50/p95/p99 latency and images/s per row, then the targets' ratios.

    python bench/serving.py [--requests 2000] [--peer-requests 200] [--json bench-serving.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import header  # noqa: E402

CONCURRENCY = (1, 8, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="project root (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per row for our service")
    parser.add_argument("--peer-requests", type=int, default=200, help="requests per row for mlflow")
    parser.add_argument("--batch-timeout-ms", type=float, help="batching on: default serve.batch_timeout_ms")
    parser.add_argument("--skip-peer", action="store_true", help="leave out `mlflow models serve`")
    parser.add_argument("--only-loop", action="store_true", help="only the log and shadow rows")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {process.returncode}")
        try:
            with opener.open(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer 200 within {timeout:.0f} s")


def start(command: list[str], ready: str, root: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")  # the project's store
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    wait_for(ready, process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(20)


async def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict[str, float]:
    """Send `requests` POSTs (bodies in turn) with `concurrency` in flight; latency and throughput."""
    import aiohttp

    latencies: list[float] = []
    failures = 0
    counter = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failures
            for index in counter:
                started = time.perf_counter()
                async with session.post(url, data=bodies[index % len(bodies)], headers=headers) as answer:
                    await answer.read()
                    if answer.status != 200:
                        failures += 1
                latencies.append(time.perf_counter() - started)

        for _ in range(min(20, requests)):  # warm-up, not timed
            async with session.post(url, data=bodies[0], headers=headers) as answer:
                await answer.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "p50_ms": quantiles[49] * 1000,
        "p95_ms": quantiles[94] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "images_per_s": requests / elapsed,
        "failures": failures,
    }


def shadow_counts(port: int) -> dict[str, float]:
    """The service's shadow counters: images the challenger scored, and images it skipped."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    counts = {"shadow_scored": 0.0, "shadow_skipped": 0.0}
    for line in text.splitlines():
        if line.startswith("serving_shadow_scored_images_total"):
            counts["shadow_scored"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("serving_shadow_skipped_images_total"):
            counts["shadow_skipped"] += float(line.rsplit(" ", 1)[1])
    return counts


def ceiling(model, pixels, batch: int, repeats: int = 5) -> float:
    """Images/s of predict_on_batch on decoded images in batches of `batch` (median of repeats)."""
    rates = []
    model.predict_on_batch(pixels[:batch])
    for _ in range(repeats):
        started = time.perf_counter()
        for index in range(0, len(pixels), batch):
            model.predict_on_batch(pixels[index : index + batch])
        rates.append(len(pixels) / (time.perf_counter() - started))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root.resolve()
    import mlflow

    from pipeline import registry, tracking
    from pipeline.artifacts import image_files, read_split
    from pipeline.config import load_config
    from pipeline.images import load_files
    from pipeline.paths import StagePaths

    cfg = load_config(root / "params.yaml")
    paths = StagePaths.from_config(cfg.paths, root)
    tracking.configure(cfg.mlflow, root)
    name = cfg.mlflow.registered_model
    champion = registry.champion(name)
    if champion is None:
        raise SystemExit(f"no champion of {name} in {tracking.tracking_uri(root)}: run `make run` first")
    files = image_files(read_split(paths, "test"), root)
    bodies = [
        json.dumps({"instances": [{"b64": base64.b64encode(f.read_bytes()).decode()}]}).encode()
        for f in files
    ]
    model = registry.load_model(champion)
    size = int(model.input_shape[1])
    pixels = load_files(files, size)
    peer_bodies = [json.dumps({"instances": [image.tolist()]}).encode() for image in pixels]

    print(header(["tensorflow", "keras", "fastapi", "uvicorn", "mlflow", "aiohttp"]))
    print(f"champion {champion}, {len(files)} test images ({size}x{size} model input), one image per request")
    rows = []
    timeout = cfg.serve.batch_timeout_ms if args.batch_timeout_ms is None else args.batch_timeout_ms
    logs = root / ".cache" / "bench-serving"
    logs.mkdir(parents=True, exist_ok=True)

    def serve(label: str, batch_timeout: float, concurrencies: tuple[int, ...], *extra: str) -> None:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "serving",
            "--port",
            str(port),
            "--batch-timeout-ms",
            str(batch_timeout),
        ]
        command += ["--log-dir", str(logs / f"log-{port}"), "--batch-images", "1000000000", *extra]
        server = start(
            command, f"http://127.0.0.1:{port}/v2/health/ready", root, logs / f"serving-{port}.log"
        )
        try:
            if "--shadow-fraction" in extra:
                wait_for(f"http://127.0.0.1:{port}/v1/models/{name}/labels/canary", server)
            for concurrency in concurrencies:
                url = f"http://127.0.0.1:{port}/v1/models/{name}:predict"
                shadowed = shadow_counts(port)
                row = asyncio.run(load(url, bodies, args.requests, concurrency))
                if "--shadow-fraction" in extra:  # what the challenger scored, and what it shed
                    time.sleep(2)
                    after = shadow_counts(port)
                    row.update({key: after[key] - shadowed[key] for key in after})
                rows.append({"server": f"{label} ({batch_timeout:g} ms)", "concurrency": concurrency, **row})
                print(rows[-1], flush=True)
        finally:
            stop(server)

    if not args.only_loop:
        serve("ours, batching on", timeout, CONCURRENCY)
        serve("ours, batching off", 0.0, CONCURRENCY)
    serve("ours, log on", timeout, (32,))
    serve("ours, log off", timeout, (32,), "--log-sample", "0")
    other = registry.newest_other_version(name, champion.version)
    if other is None:
        print(f"only one version of {name}: no shadow rows (make drift-demo or a second make run adds one)")
    else:
        before = registry.aliased(name, registry.CHALLENGER)
        registry.set_alias(name, registry.CHALLENGER, other)
        try:
            serve("ours, shadow 0", timeout, (1, 32), "--shadow-fraction", "0")
            serve("ours, shadow 0.5", timeout, (1, 32), "--shadow-fraction", "0.5")
        finally:
            if before is None:
                mlflow.MlflowClient().delete_registered_model_alias(name, registry.CHALLENGER)
            else:
                registry.set_alias(name, registry.CHALLENGER, before.version)
    if not args.skip_peer and not args.only_loop:
        port = free_port()
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion"]
        command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
        server = start(command, f"http://127.0.0.1:{port}/ping", root, logs / f"mlflow-{port}.log")
        try:
            for concurrency in CONCURRENCY:
                url = f"http://127.0.0.1:{port}/invocations"
                row = asyncio.run(load(url, peer_bodies, args.peer_requests, concurrency))
                rows.append({"server": "mlflow models serve", "concurrency": concurrency, **row})
                print(rows[-1], flush=True)
        finally:
            stop(server)
    batch = cfg.serve.max_batch_size
    top = 0.0 if args.only_loop else ceiling(model, pixels, batch)
    rows.append(
        {"server": f"in-process predict_on_batch (batch {batch})", "concurrency": 0, "images_per_s": top}
    )

    print("\n| server | concurrency | p50 ms | p95 ms | p99 ms | images/s | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if row["concurrency"] == 0 and args.only_loop:
            continue
        if row["concurrency"] == 0:
            print(f"| {row['server']} | - | - | - | - | {row['images_per_s']:.0f} | - |")
            continue
        print(
            f"| {row['server']} | {row['concurrency']} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | "
            f"{row['p99_ms']:.1f} | {row['images_per_s']:.0f} | {row['failures']} |"
        )

    def rate(server: str, concurrency: int) -> float:
        return next(
            r["images_per_s"]
            for r in rows
            if r["server"].startswith(server) and r["concurrency"] == concurrency
        )

    def p99(server: str, concurrency: int) -> float:
        return next(
            r["p99_ms"] for r in rows if r["server"].startswith(server) and r["concurrency"] == concurrency
        )

    print()
    if not args.only_loop:
        on, off = rate("ours, batching on", 32), rate("ours, batching off", 32)
        print(f"batching on / off at concurrency 32: {on / off:.2f}x (target >= 3)")
        print(f"batching on at 32 / in-process ceiling: {on / top:.2f} (target >= 0.5)")
        print(f"p99 at concurrency 1, batching on: {p99('ours, batching on', 1):.1f} ms (target < 10)")
    logged, unlogged = rate("ours, log on", 32), rate("ours, log off", 32)
    print(
        f"log on (images stored) / log off, images/s at concurrency 32: {logged / unlogged:.3f} "
        "(target >= 0.9)"
    )
    if other is not None:
        for concurrency in (1, 32):
            ratio = p99("ours, shadow 0.5", concurrency) / p99("ours, shadow 0 ", concurrency)
            shadowed = next(
                r
                for r in rows
                if r["server"].startswith("ours, shadow 0.5") and r["concurrency"] == concurrency
            )
            print(
                f"p99 shadow 0.5 / shadow 0 at concurrency {concurrency}: {ratio:.3f} (target <= 1.1); "
                f"challenger scored {shadowed['shadow_scored']:.0f} images, skipped "
                f"{shadowed['shadow_skipped']:.0f} (of about {args.requests // 2} shadowed)"
            )
    if not args.skip_peer and not args.only_loop:
        peer = rate("mlflow models serve", 32)
        print(f"ours (batching on) / mlflow models serve at concurrency 32: {on / peer:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
