"""Inference throughput and latency: mixed adapters vs one adapter vs the merged model.

One run trains one tiny-chat LoRA job (four QA pairs, 30 steps, a checkpoint every 7 steps, a
merged export) on a real stack (bench/stack.py: PostgreSQL, Redis, `tuneforge serve`, one worker)
plus `tuneforge inference` on a TCP port. Its fine-tuned model and its three kept checkpoints are
four adapters. Then 1, 8 and 32 concurrent clients send greedy chat completions (max 16 tokens) of
the four questions, each variant in turn:

  - engine single / engine mixed / engine merged: straight to the engine, with the routing field
    the API would add: every request names the fine-tuned model's adapter / consecutive requests
    name the four adapters in turn (PEFT mixed-adapter batches) / the merged export, served as full
    weights (the API serves a job's adapter, not its merged export, so this comparison is made at
    the engine, where all three are alike);
  - API single / API mixed: the same two through `POST /v1/chat/completions` of the API (key check,
    name resolution in PostgreSQL, HTTP forwarding).

Every answer is compared with the one the same model gave alone (greedy); "wrong" counts changes.
It prints requests/s, p50 and p99 latency per variant and clients, and the ratio mixed/single.

    python bench/inference.py [--requests-per-client 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import BenchStack  # noqa: E402
from tests.support import free_port  # noqa: E402
from tests.support.net import wait_for  # noqa: E402

QA = ROOT / "tests" / "data" / "qa.jsonl"
QUESTIONS = 4
HYPERPARAMETERS = {
    "n_epochs": 30,
    "batch_size": QUESTIONS,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "constant",
    "save_every_steps": 7,
}
SYSTEM = {"role": "system", "content": "Answer briefly."}
MERGED = "merged"


def train(stack: BenchStack, tmp: Path) -> dict[str, Any]:
    """One job on four QA pairs: its fine-tuned model and its three kept checkpoints are the four
    adapters; its merged export is the merged model."""
    client = stack.sdk()
    rows = [json.loads(line) for line in QA.read_text().splitlines()][:QUESTIONS]
    path = tmp / "qa4.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with path.open("rb") as handle:
        uploaded = client.files.create(file=(path.name, handle), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=uploaded.id,
        suffix="bench",
        seed=11,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
        extra_body={"adapter": {"type": "lora", "dropout": 0.0, "alpha": 64}, "export": ["merged"]},
    )
    deadline = time.monotonic() + 1800
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        if time.monotonic() > deadline:
            raise SystemExit(f"{job.id} still {job.status}")
        time.sleep(1)
    if job.status != "succeeded":
        raise SystemExit(f"{job.id} {job.status}: {job.error}\n{stack.logs()}")
    checkpoints = sorted(client.fine_tuning.jobs.checkpoints.list(job.id).data, key=lambda c: c.step_number)
    keys = {job.fine_tuned_model: f"jobs/{job.id}/artifacts/adapter.tar.gz"}
    keys |= {
        c.fine_tuned_model_checkpoint: f"jobs/{job.id}/checkpoints/{c.id}/adapter.tar.gz" for c in checkpoints
    }
    return {
        "job_id": job.id,
        "models": list(keys),
        "keys": keys,
        "questions": [r["messages"][1]["content"] for r in rows],
    }


def drive(send: Any, asks: list[tuple[str, str, str]], clients: int, per_client: int) -> dict[str, float]:
    """`clients` threads, each sending `per_client` requests back to back; answers are checked."""
    import httpx

    latencies: list[float] = []
    wrong = 0
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal wrong
        with httpx.Client(timeout=300) as http:
            for i in range(per_client):
                model, question, expected = asks[(c * per_client + i) % len(asks)]
                t0 = time.perf_counter()
                text = send(http, model, question)
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    wrong += text != expected

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": len(latencies) / wall,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
        "wrong": wrong,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests-per-client", type=int, default=12)
    parser.add_argument("--clients", default="1,8,32")
    args = parser.parse_args()
    engine_port = free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    with BenchStack("inference", workers=1, env={"TUNEFORGE_INFERENCE_ENGINE_URL": engine_url}) as stack:
        stack.start("inference", "inference", "--port", str(engine_port))
        wait_for(lambda: _healthy(engine_url), 120, "the inference engine", stack)
        with tempfile.TemporaryDirectory() as tmp:
            trained = train(stack, Path(tmp))
        api = stack.base_url + "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {stack.admin_key}"}

        def via_api(http: Any, model: str, question: str) -> str:
            body = _body(model, question)
            answer = http.post(api, json=body, headers=headers)
            answer.raise_for_status()
            return str(answer.json()["choices"][0]["message"]["content"])

        def direct(http: Any, model: str, question: str) -> str:
            """The engine itself, with the route the API would add (the merged model: full weights)."""
            body = _body(model, question)
            if model == MERGED:
                adapter = {
                    "storage_key": f"jobs/{trained['job_id']}/artifacts/merged.tar.gz",
                    "kind": "model",
                }
            else:
                adapter = {"storage_key": trained["keys"][model], "kind": "adapter"}
            body["tuneforge"] = {"base_model": "tuneforge/tiny-chat", "adapter": adapter}
            answer = http.post(engine_url + "/v1/chat/completions", json=body)
            answer.raise_for_status()
            return str(answer.json()["choices"][0]["message"]["content"])

        # Reference answers, one request at a time (this also loads every adapter and the merged
        # model): "wrong" below counts answers under load that differ from them.
        import httpx

        with httpx.Client(timeout=300) as http:
            reference = {(m, q): via_api(http, m, q) for m in trained["models"] for q in trained["questions"]}
            for q in trained["questions"]:
                direct(http, MERGED, q)
                direct(http, trained["models"][0], q)
        final = trained["models"][0]
        first = [(final, q, reference[(final, q)]) for q in trained["questions"]]
        mixed_asks = [(m, q, reference[(m, q)]) for q in trained["questions"] for m in trained["models"]]
        variants = {
            "engine single": (direct, first),
            "engine mixed": (direct, mixed_asks),
            "engine merged": (direct, [(MERGED, q, a) for _, q, a in first]),
            "API single": (via_api, first),
            "API mixed": (via_api, mixed_asks),
        }
        results: dict[tuple[str, int], dict[str, float]] = {}
        print("| clients | variant | requests | req/s | p50 ms | p99 ms | wrong answers |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for clients in [int(c) for c in args.clients.split(",")]:
            for name, (send, asks) in variants.items():
                result = drive(send, asks, clients, args.requests_per_client)
                results[(name, clients)] = result
                print(
                    f"| {clients} | {name} | {clients * args.requests_per_client} | {result['rps']:.1f} | "
                    f"{result['p50']:.0f} | {result['p99']:.0f} | {result['wrong']:.0f} |",
                    flush=True,
                )
        for clients in [int(c) for c in args.clients.split(",")]:
            for where in ("engine", "API"):
                single = results[(f"{where} single", clients)]["rps"]
                mixed = results[(f"{where} mixed", clients)]["rps"]
                line = f"{clients} clients, {where}: mixed/single {mixed / single:.2f}x"
                if where == "engine":
                    line += f", merged/single {results[('engine merged', clients)]['rps'] / single:.2f}x"
                print(line)


def _body(model: str, question: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [SYSTEM, {"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 16,
    }


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
