"""The optional vLLM backend (`TUNEFORGE_INFERENCE_URL`): an existing vLLM server, started with
`--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, serves the base model; the API unpacks
a fine-tuned model's adapter into `inference_adapter_dir` (a directory the vLLM server reads too)
and registers it with vLLM's documented `POST /v1/load_lora_adapter` under the model's own name,
so the forwarded request (and vLLM's answer) keep the name the caller used.

Written against vLLM's documented API; not exercised by this repository's tests (no GPU here)."""

from __future__ import annotations

from typing import Any

import httpx
from anyio import to_thread

from tuneforge.api.errors import BadRequest, ServiceUnavailable
from tuneforge.config import Settings
from tuneforge.inference.adapters import AdapterFetcher
from tuneforge.inference.protocol import Route
from tuneforge.storage import ObjectStore

_registered: set[str] = set()


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
    if name in _registered:
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
    _registered.add(name)
    return payload
