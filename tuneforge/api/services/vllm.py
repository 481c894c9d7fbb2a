"""The optional vLLM backend (`TUNEFORGE_INFERENCE_URL`): an existing vLLM server, started with
`--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, serves the base model; the API unpacks
a fine-tuned model's adapter into `inference_adapter_dir` (a directory the vLLM server reads too)
and registers it with vLLM's documented `POST /v1/load_lora_adapter` under the model's own name,
so the forwarded request (and vLLM's answer) keep the name the caller used.

vLLM keeps runtime-loaded adapters in memory only: after a restart it answers 404 for their names.
The API then forgets the name (`forget_vllm`), hands the adapter over again and retries once.

Written against vLLM's documented API; tested against a stand-in server that implements those
endpoints (tests/api/test_vllm_backend.py), since vLLM needs a GPU."""

from __future__ import annotations

import weakref
from typing import Any

import httpx
from anyio import to_thread

from tuneforge.api.errors import BadRequest, ServiceUnavailable
from tuneforge.config import Settings
from tuneforge.inference.adapters import AdapterFetcher
from tuneforge.inference.protocol import Route
from tuneforge.storage import ObjectStore

_registered: weakref.WeakKeyDictionary[httpx.AsyncClient, set[str]] = weakref.WeakKeyDictionary()
"""The adapter names handed to the vLLM server behind each client (one client per API process)."""


async def prepare_vllm(
    client: httpx.AsyncClient, store: ObjectStore, settings: Settings, route: Route, payload: dict[str, Any]
) -> dict[str, Any]:
    """`payload` ready for vLLM: the base model's id, or a LoRA adapter vLLM has loaded."""
    if route.adapter is None:
        return payload
    if route.adapter.kind != "adapter":
        raise BadRequest(
            "Full fine-tunes are served by the built-in engine only.",
            param="model",
            code="model_not_supported",
        )
    name = str(payload["model"])
    registered = _registered.setdefault(client, set())
    if name in registered:
        return payload
    fetcher = AdapterFetcher(store, settings.inference_adapter_dir or settings.data_dir / "served-adapters")
    directory = await to_thread.run_sync(fetcher.fetch, route.adapter.storage_key)
    try:
        answer = await client.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(directory)}
        )
    except httpx.TransportError as exc:
        raise ServiceUnavailable("The vLLM server is unavailable.", code="service_unavailable") from exc
    if answer.status_code != 200 and "already" not in answer.text:
        raise ServiceUnavailable(f"vLLM refused the adapter: {answer.text[:200]}", code="service_unavailable")
    registered.add(name)
    return payload


def forget_vllm(client: httpx.AsyncClient, name: str) -> bool:
    """Forgets that the vLLM server behind `client` has adapter `name` (it answered 404 for it: it
    restarted); True if it had been handed over, so that handing it over again may help."""
    registered = _registered.get(client, set())
    if name not in registered:
        return False
    registered.discard(name)
    return True
