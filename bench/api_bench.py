"""API benchmark: a real `tuneforge serve` (uvicorn) on PostgreSQL, 32 concurrent keep-alive
clients, three routes side by side in one run:

- GET /healthz, the bare route of the same app returning a constant: the baseline;
- GET /v1/fine_tuning/jobs/{id}: bearer-key check + one read of the job's shown columns + JSON;
- POST /v1/fine_tuning/jobs: validation, file and model checks, 4 inserts, commit, enqueue.

Prints requests/s, p50 and p99 latency, and each route's ratio to the baseline. The load generator
is a minimal HTTP/1.1 keep-alive client on asyncio streams (far cheaper per request than an HTTP
library), run in a separate process so it does not share the server's interpreter.

    .venv/bin/python bench/api_bench.py [--seconds 8] [--clients 32] [--profile]

`srv CPU us/req` is the server process's own CPU time per request: unlike requests/s it barely
moves with other load on the machine, and base CPU / route CPU is the ratio one CPU-bound server
process reaches on an idle machine ("CPU ratio"). `--profile` samples the server with py-spy
(`pip install py-spy`) while each GET route runs and prints where its CPU goes.

Run from the repository root; the stack (a throwaway PostgreSQL database, a private Redis,
`tuneforge serve`) is bench/stack.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stack import BenchStack  # noqa: E402

ADMIN_KEY = "tf-admin-bench-key"


def _request(method: str, path: str, host: str, key: str | None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _client(
    host: str, port: int, request: bytes, deadline: float, warm_until: float, latencies: list[float]
) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    errors = 0
    try:
        while (start := time.perf_counter()) < deadline:
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if not status_line.startswith(b"HTTP/1.1 200"):
                errors += 1
            if start >= warm_until:
                latencies.append(time.perf_counter() - start)
    finally:
        writer.close()
    return errors


async def _load(host: str, port: int, request: bytes, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    now = time.perf_counter()
    warm_until = now + 1.0
    deadline = warm_until + seconds
    errors = await asyncio.gather(
        *(_client(host, port, request, deadline, warm_until, latencies) for _ in range(clients))
    )
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "errors": sum(errors),
    }


def _load_in_subprocess(url: str, request: bytes, clients: int, seconds: float) -> dict[str, float]:
    """Runs `_load` in a fresh interpreter so the client and server never share a GIL."""
    code = (
        "import asyncio, json, sys; sys.path.insert(0, sys.argv[1]); from bench.api_bench import _load; "
        "print(json.dumps(asyncio.run(_load(sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4]), "
        "int(sys.argv[5]), float(sys.argv[6])))))"
    )
    host, port = url.removeprefix("http://").split(":")
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO), host, port, request.hex(), str(clients), str(seconds)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="Measured seconds per route.")
    parser.add_argument("--clients", type=int, default=32, help="Concurrent keep-alive connections.")
    parser.add_argument("--profile", action="store_true", help="Sample the server with py-spy (GET routes).")
    args = parser.parse_args()

    with BenchStack("bench-api", admin_key=ADMIN_KEY) as stack:
        return _run(stack.base_url, stack.serve_pid, args.clients, args.seconds, args.profile)


def _run(base_url: str, pid: int, clients: int, seconds: float, profile: bool = False) -> int:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    project = httpx.post(f"{base_url}/v1/admin/projects", json={"name": "bench"}, headers=admin).json()
    key = httpx.post(f"{base_url}/v1/admin/projects/{project['id']}/api_keys", headers=admin).json()["value"]
    data = (REPO / "tests" / "data" / "qa.jsonl").read_bytes()
    auth = {"Authorization": f"Bearer {key}"}
    file_id = httpx.post(
        f"{base_url}/v1/files",
        files={"file": ("qa.jsonl", data)},
        data={"purpose": "fine-tune"},
        headers=auth,
    ).json()["id"]
    create_body = json.dumps({"model": "tuneforge/tiny-chat", "training_file": file_id}).encode()
    job_id = httpx.post(
        f"{base_url}/v1/fine_tuning/jobs",
        content=create_body,
        headers={**auth, "Content-Type": "application/json"},
        timeout=300,  # the first creation may build tiny-chat for the job's estimate
    ).json()["id"]

    host = base_url.removeprefix("http://")
    routes: list[tuple[str, bytes]] = [
        ("GET /healthz (baseline)", _request("GET", "/healthz", host, None)),
        ("GET /v1/fine_tuning/jobs/{id}", _request("GET", f"/v1/fine_tuning/jobs/{job_id}", host, key)),
        ("POST /v1/fine_tuning/jobs", _request("POST", "/v1/fine_tuning/jobs", host, key, create_body)),
    ]
    results: list[tuple[str, dict[str, Any]]] = []
    server = psutil.Process(pid)
    profiles: list[tuple[str, dict[str, float]]] = []
    for label, request in routes:
        sampler = _start_profile(pid, seconds) if profile and label.startswith("GET") else None
        before = server.cpu_times()
        busy_before = psutil.cpu_times()
        result = _load_in_subprocess(base_url, request, clients, seconds)
        if sampler is not None:
            profiles.append((label, _profile_shares(sampler)))
        after = server.cpu_times()
        busy_after = psutil.cpu_times()
        # The server's own CPU time per request: robust to other load on a shared machine.
        cpu = (after.user + after.system) - (before.user + before.system)
        result["cpu_us"] = cpu / max(1, result["requests"] * (seconds + 1) / seconds) * 1e6
        idle = busy_after.idle - busy_before.idle
        result["machine_busy"] = 100 * (1 - idle / max(1e-9, sum(busy_after) - sum(busy_before)))
        results.append((label, result))

    base_rps = results[0][1]["rps"]
    print(f"PostgreSQL, {clients} concurrent clients, {seconds:.0f} s per route, {os.cpu_count()} CPUs")
    print(
        f"{'route':32} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs base':>8} "
        f"{'srv CPU us/req':>15} {'CPU ratio':>10} {'machine busy':>13} {'errors':>7}"
    )
    base_cpu = results[0][1]["cpu_us"]
    for label, r in results:
        print(
            f"{label:32} {r['rps']:8.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
            f"{r['rps'] / base_rps:8.2f} {r['cpu_us']:15.0f} {base_cpu / r['cpu_us']:10.2f} "
            f"{r['machine_busy']:12.0f}% {int(r['errors']):7d}"
        )
    for label, shares in profiles:
        cpu_us = dict(results)[label]["cpu_us"]
        print(f"\nWhere {label} spends the server's CPU (py-spy samples; share x {cpu_us:.0f} us):")
        for part, share in sorted(shares.items(), key=lambda item: -item[1]):
            print(f"  {part:58} {100 * share:5.1f}%  ~{share * cpu_us:5.0f} us")
    get = results[1][1]
    ok = get["rps"] >= 0.4 * base_rps and get["p99_ms"] < 50
    print(f"goal (job GET >= 0.40x baseline req/s and p99 < 50 ms): {'met' if ok else 'MISSED'}")
    return 0 if all(r["errors"] == 0 for _, r in results) else 1


# Where a sampled stack's time goes: the innermost frame whose file matches a part names it.
PROFILE_PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("JSON: building and encoding the body", ("json/encoder", "json/__init__", "api/schemas.py")),
    ("database read: psycopg, its pool, row decoding", ("psycopg", "tuneforge/db.py", "models/job.py")),
    ("key check and rate limit", ("api/auth.py", "api/ratelimit.py", "api/deps.py", "hmac", "hashlib")),
    ("NUL check middleware", ("api/nul.py",)),
    ("FastAPI: dependencies, parameters, route call", ("fastapi/",)),
    ("Starlette: routing, responses, exception middleware", ("starlette/",)),
    ("HTTP: uvicorn and h11 parsing and writing", ("uvicorn/", "h11/", "httptools")),
    ("asyncio event loop, sockets, tasks", ("asyncio/", "selectors", "socket")),
]


def _start_profile(pid: int, seconds: float) -> tuple[subprocess.Popen[bytes], Path]:
    """py-spy sampling the server's main thread for the measured seconds (after the warm-up)."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"api-bench-{pid}-{time.monotonic_ns()}.txt"
    py_spy = Path(sys.executable).parent / "py-spy"
    command = [str(py_spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
    command += ["--duration", str(int(seconds)), "--output", str(out), "--nonblocking"]
    process = subprocess.Popen(
        ["sh", "-c", f"sleep 1 && exec {' '.join(command)}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, out


def _profile_shares(sampler: tuple[subprocess.Popen[bytes], Path]) -> dict[str, float]:
    """Each part's share of the server's busy samples (idle waits in the selector left out)."""
    process, out = sampler
    process.wait(timeout=120)
    counts: dict[str, float] = {}
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames and "select (selectors.py" in frames[-1]:
            continue  # waiting for the network, not working
        part = "other"
        for frame in reversed(frames):
            found = next((name for name, keys in PROFILE_PARTS if any(k in frame for k in keys)), None)
            if found is not None:
                part = found
                break
        counts[part] = counts.get(part, 0) + int(count)
    out.unlink(missing_ok=True)
    total = sum(counts.values()) or 1
    return {part: n / total for part, n in counts.items()}


if __name__ == "__main__":
    raise SystemExit(main())
