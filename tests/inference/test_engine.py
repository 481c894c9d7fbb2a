"""The engine itself, on tiny-chat with real PEFT adapters (random LoRA weights, so that each
adapter answers differently): a batch that mixes adapters and the base gives each row what it gets
alone, the LRU cache evicts, a full queue refuses, a cancelled request leaves the batch."""

from __future__ import annotations

import asyncio
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tuneforge.inference.adapters import AdapterFetcher
from tuneforge.inference.engine import Engine, EngineError, Event, Generation, Sampling
from tuneforge.inference.protocol import AdapterRef, Route
from tuneforge.storage.filesystem import FilesystemStore

BASE = "tuneforge/tiny-chat"
QUESTIONS = ["What is the capital of France?", "Hello there, who are you?"]
# Seconds a request may take, loading the base and an adapter included: headroom for a loaded CI
# machine (tests never wait for it unless something is broken).
WAIT = 600


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_chat_path: Path) -> Iterator[FilesystemStore]:
    """Three LoRA adapters of tiny-chat with random (non-zero) weights, stored as the worker stores
    them: `.tar.gz` archives with the adapter's files at the root."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("inference-store")
    store = FilesystemStore(root / "objects")
    for k in range(3):
        torch.manual_seed(100 + k)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_chat_path),
            LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False),
        )
        out = root / f"adapter{k}"
        model.save_pretrained(str(out))
        archive = root / f"adapter{k}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(out.iterdir()):
                tar.add(path, arcname=path.name)
        store.put_file(f"jobs/job{k}/artifacts/adapter.tar.gz", archive)
    yield store


def _route(k: int | None) -> Route:
    if k is None:
        return Route(base_model=BASE)
    return Route(base_model=BASE, adapter=AdapterRef(storage_key=f"jobs/job{k}/artifacts/adapter.tar.gz"))


def _engine(store: FilesystemStore, tiny_chat_path: Path, tmp: Path, **limits: int) -> Engine:
    options = {"adapters_per_base": 4, "max_batch": 32, "max_queued": 64, **limits}
    return Engine(
        lambda model_id: tiny_chat_path,
        AdapterFetcher(store, tmp / "cache"),
        timeout_seconds=WAIT,
        **options,
    )


async def _collect(generation: Generation) -> tuple[list[str], dict[str, int]]:
    texts = [""] * generation.sequences
    while True:
        event: Event = await asyncio.wait_for(generation.queue.get(), WAIT)
        if event.kind == "error":
            assert event.error is not None
            raise event.error
        if event.kind == "done":
            assert event.usage is not None
            return texts, event.usage
        texts[event.index] += event.text


def _submit(engine: Engine, k: int | None, question: str, **sampling: object) -> Generation:
    params: dict[str, object] = {"max_tokens": 6, "temperature": 0.0, **sampling}
    messages = [{"role": "user", "content": question}]
    return engine.submit(_route(k), Sampling(**params), n=1, messages=messages)  # type: ignore[arg-type]


def _generate(store: FilesystemStore, tiny_chat_path: Path, tmp: Path, k: int, question: str) -> str:
    """What transformers' own greedy `generate` answers with adapter k."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = AdapterFetcher(store, tmp / "reference").fetch(f"jobs/job{k}/artifacts/adapter.tar.gz")
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_path), directory).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def test_a_mixed_batch_answers_each_row_as_it_is_answered_alone(
    store: FilesystemStore, tiny_chat_path: Path, tmp_path: Path
) -> None:
    engine = _engine(store, tiny_chat_path, tmp_path)
    asks = [(k, q) for k in (None, 0, 1, 2) for q in QUESTIONS]

    async def scenario() -> tuple[list[str], list[str]]:
        alone = []
        for k, q in asks:
            texts, usage = await _collect(_submit(engine, k, q))
            assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 5
            alone.append(texts[0])
        runners = list(engine.runners.values())
        assert len(runners) == 1 and len(runners[0].loaded) == 3
        together = await asyncio.gather(*(_collect(_submit(engine, k, q)) for k, q in asks))
        return alone, [texts[0] for texts, _ in together]

    alone, together = asyncio.run(scenario())
    assert together == alone
    assert alone[len(QUESTIONS)] == _generate(store, tiny_chat_path, tmp_path, 0, QUESTIONS[0])
    by_adapter = [tuple(alone[i : i + len(QUESTIONS)]) for i in range(0, len(alone), len(QUESTIONS))]
    assert len(set(by_adapter)) == 4, "the adapters must answer differently for this test to mean anything"


def test_lru_cache_queue_limit_seed_and_cancel(
    store: FilesystemStore, tiny_chat_path: Path, tmp_path: Path
) -> None:
    engine = _engine(store, tiny_chat_path, tmp_path, adapters_per_base=2, max_queued=4)

    async def scenario() -> None:
        for k in (0, 1, 2):
            await _collect(_submit(engine, k, QUESTIONS[0]))
        runner = next(iter(engine.runners.values()))
        assert len(runner.loaded) == 2  # adapter 0, the least recently used, went

        sampled = [
            await _collect(_submit(engine, 1, QUESTIONS[1], temperature=1.0, seed=7)) for _ in range(2)
        ]
        assert sampled[0][0] == sampled[1][0]

        long = [_submit(engine, None, QUESTIONS[1], max_tokens=500) for _ in range(4)]
        with pytest.raises(EngineError) as full:
            _submit(engine, None, QUESTIONS[1])
        assert full.value.status == 429
        for generation in long:
            generation.cancel()  # frees the slot now, however far the loop has got
        assert engine.in_flight == 0
        await _collect(_submit(engine, None, QUESTIONS[0]))  # once the cancelled rows have left
        assert engine.in_flight == 0  # freed before the answer's last event
        for generation in long:
            generation.cancel()  # again, or after its end: no slot is given back twice
        assert engine.in_flight == 0

    asyncio.run(scenario())
