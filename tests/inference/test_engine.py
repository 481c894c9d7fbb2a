"""The engine itself, on tiny-chat with real PEFT adapters (random weights, so that each adapter
answers differently): a batch that mixes adapters and the base goes through the model as one and
gives each row what it gets alone, the LRU cache evicts the least recently used adapter, a full
queue refuses, a cancelled request leaves the batch, a slow adapter load holds up no loaded
adapter, and IA3, prompt tuning and prefix tuning adapters answer what PEFT's forward computes."""

from __future__ import annotations

import asyncio
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.support.decoding import full_sequence_greedy
from tuneforge.inference.adapters import AdapterFetcher, cache_name
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
    from peft import IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("inference-store")
    store = FilesystemStore(root / "objects")
    configs: dict[str, PeftConfig] = {
        f"job{k}": LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
        for k in range(3)
    }
    configs.update(
        {
            # The training recipes' configs (tuneforge/training/loading.py), with random weights.
            "ia3": IA3Config(
                task_type="CAUSAL_LM",
                target_modules=["k_proj", "v_proj", "down_proj"],
                feedforward_modules=["down_proj"],
                init_ia3_weights=False,
            ),
            "prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
            "prompt_tuning2": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
            "prefix_tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
        }
    )
    for seed, (job, config) in enumerate(configs.items()):
        torch.manual_seed(100 + seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_path), config)
        if job == "ia3":  # random scales far enough from 1 to change the answers
            for name, parameter in model.named_parameters():
                if "ia3_l" in name:
                    parameter.data = torch.rand_like(parameter) * 3
        out = root / job
        model.save_pretrained(str(out))
        archive = root / f"{job}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(out.iterdir()):
                tar.add(path, arcname=path.name)
        store.put_file(f"jobs/{job}/artifacts/adapter.tar.gz", archive)
    yield store


def _route(k: int | str | None) -> Route:
    """The base (None), LoRA adapter k, or the adapter of another method (its family's name)."""
    if k is None:
        return Route(base_model=BASE)
    if isinstance(k, int):
        return Route(base_model=BASE, adapter=AdapterRef(storage_key=_key(k)))
    family = k.removesuffix("2")  # prompt_tuning2: a second prompt-tuning adapter
    return Route(base_model=BASE, adapter=AdapterRef(storage_key=_key(k), family=family))


def _key(k: int | str) -> str:
    return f"jobs/{'job' if isinstance(k, int) else ''}{k}/artifacts/adapter.tar.gz"


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


def _submit(engine: Engine, k: int | str | None, question: str, **sampling: object) -> Generation:
    params: dict[str, object] = {"max_tokens": 6, "temperature": 0.0, **sampling}
    messages = [{"role": "user", "content": question}]
    return engine.submit(_route(k), Sampling(**params), n=1, messages=messages)  # type: ignore[arg-type]


def _generate(store: FilesystemStore, tiny_chat_path: Path, tmp: Path, k: int | str, question: str) -> str:
    """Adapter k's greedy answer computed as training computes it: PEFT's forward over the whole
    sequence at each step, no KV cache."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = AdapterFetcher(store, tmp / "reference").fetch(_key(k))
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_path), directory)
    return full_sequence_greedy(model, tokenizer, [{"role": "user", "content": question}], 6)


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
        runner = runners[0]
        assert runner.stats.most_adapters == 1  # one request at a time so far
        with runner.cond:  # all eight wait when the loop next looks: one batch
            generations = [_submit(engine, k, q) for k, q in asks]
        together = await asyncio.gather(*(_collect(g) for g in generations))
        # They went through the model together: a forward with all eight rows, whose
        # adapter_names held the base and the three adapters.
        assert (runner.stats.most_rows, runner.stats.most_adapters) == (len(asks), 4)
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
        for k in (0, 1, 0, 2):
            await _collect(_submit(engine, k, QUESTIONS[0]))
        runner = next(iter(engine.runners.values()))
        # Adapter 1, the least recently used (not the first loaded), went; 0 was used after it.
        assert list(runner.loaded) == [cache_name(_key(0)), cache_name(_key(2))]

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


class SlowStoreFake(FilesystemStore):
    """A test fake for a slow object store (a far bucket, a large adapter): downloads of `slow_key`
    hang until `gate` is set, so an adapter's load lasts as long as the test wants; other keys
    download at once."""

    def __init__(self, root: Path, slow_key: str, gate: threading.Event) -> None:
        super().__init__(root)
        self.slow_key = slow_key
        self.gate = gate
        self.started = threading.Event()

    def download(self, key: str, path: Path) -> None:
        if key == self.slow_key:
            self.started.set()
            assert self.gate.wait(WAIT), "the test never let the slow download end"
        super().download(key, path)


def test_loading_a_new_adapter_does_not_hold_up_loaded_ones(
    store: FilesystemStore, tiny_chat_path: Path, tmp_path: Path
) -> None:
    """While adapter 2's download hangs, adapter 0 (loaded before) and the base go on answering,
    request after request, each as before; adapter 2's request waits meanwhile, and is answered
    once its download ends."""
    gate = threading.Event()
    slow = SlowStoreFake(store.root, _key(2), gate)
    engine = _engine(slow, tiny_chat_path, tmp_path)

    async def scenario() -> None:
        before = [(await _collect(_submit(engine, k, QUESTIONS[0])))[0] for k in (0, None)]
        runner = engine.runners[f"base:{BASE}"]
        waiting = _submit(engine, 2, QUESTIONS[0])
        try:
            assert await asyncio.to_thread(slow.started.wait, WAIT)
            for _ in range(3):
                for k, answer in zip((0, None), before, strict=True):
                    texts, _ = await _collect(_submit(engine, k, QUESTIONS[0]))
                    assert texts == answer
            assert cache_name(_key(2)) in runner.loading, "the slow load must still be going on"
            assert waiting.queue.empty() and waiting.open_rows == 0
        finally:
            gate.set()
        texts, usage = await _collect(waiting)
        assert usage["completion_tokens"] >= 1
        assert list(runner.loaded) == [cache_name(_key(0)), cache_name(_key(2))]

    asyncio.run(scenario())


def test_ia3_prompt_and_prefix_tuning_adapters_answer_as_peft_computes(
    store: FilesystemStore, tiny_chat_path: Path, tmp_path: Path
) -> None:
    """Each method on a runner of its own (its batches one adapter each), all asked at once beside
    LoRA and the base: each answer is what PEFT's forward makes of it greedily, and differs from
    the base's."""
    engine = _engine(store, tiny_chat_path, tmp_path)
    others = ["ia3", "prompt_tuning", "prompt_tuning2", "prefix_tuning"]
    asks = [(k, q) for k in (None, 0, *others) for q in QUESTIONS]

    async def scenario() -> tuple[list[str], list[str]]:
        together = await asyncio.gather(*(_collect(_submit(engine, k, q)) for k, q in asks))
        sampled = [
            await _collect(_submit(engine, "prefix_tuning", QUESTIONS[0], temperature=1.0, seed=3))
            for _ in range(2)
        ]
        return [texts[0] for texts, _ in together], [texts[0] for texts, _ in sampled]

    answers, sampled = asyncio.run(scenario())
    assert sampled[0] == sampled[1]
    assert sorted(engine.runners) == [
        f"base:{BASE}",
        f"base:{BASE}:ia3",
        f"base:{BASE}:prefix_tuning",
        f"base:{BASE}:prompt_tuning",
    ]
    base = answers[: len(QUESTIONS)]
    for i, (k, question) in enumerate(asks):
        if k in others:
            assert answers[i] == _generate(store, tiny_chat_path, tmp_path, k, question), (k, question)
    by_adapter = [tuple(answers[i : i + len(QUESTIONS)]) for i in range(0, len(answers), len(QUESTIONS))]
    assert len(set(by_adapter)) == len(by_adapter), by_adapter
    assert all(tuple(base) != answered for answered in by_adapter[1:])


def test_the_adapter_cache_stays_within_its_limit(
    store: FilesystemStore, tiny_chat_path: Path, tmp_path: Path
) -> None:
    """Cycling through more adapters than the cache holds, one at a time and all at once, leaves
    one adapter's weights in the model and one unpacked copy on disk (no growth), and evicted
    adapters still answer as they did (fetched again from the store)."""
    engine = _engine(store, tiny_chat_path, tmp_path, adapters_per_base=1)
    cache = tmp_path / "cache"

    def footprint() -> tuple[int, int, int, int]:
        runner = engine.runners[f"base:{BASE}"]
        model = runner.model
        unpacked = [p for p in cache.iterdir() if not p.name.startswith(".")]
        return (
            len(runner.loaded),
            len(model.peft_config),
            sum(p.numel() for p in model.parameters()),
            len(unpacked),
        )

    async def scenario() -> None:
        first: dict[int, str] = {}
        sizes = set()
        for k in (0, 1, 2, 0, 1, 2):
            texts, _ = await _collect(_submit(engine, k, QUESTIONS[0]))
            assert first.setdefault(k, texts[0]) == texts[0]
            loaded, configs, parameters, unpacked = footprint()
            assert (loaded, configs, unpacked) == (1, 1, 1)
            sizes.add(parameters)
        assert len(sizes) == 1, sizes
        together = await asyncio.gather(*(_collect(_submit(engine, k, QUESTIONS[0])) for k in (0, 1, 2)))
        assert [texts[0] for texts, _ in together] == [first[k] for k in (0, 1, 2)]
        # All three were needed at once; once they are answered the cache shrinks back (at the
        # latest before the next batch, which this request is).
        await _collect(_submit(engine, 1, QUESTIONS[0]))
        loaded, configs, parameters, unpacked = footprint()
        assert (loaded, configs, unpacked) == (1, 1, 1) and parameters in sizes

    asyncio.run(scenario())


def test_a_short_request_joins_a_running_batch_instead_of_waiting_for_it(
    store: FilesystemStore, tiny_chat_path: Path, tmp_path: Path
) -> None:
    """Continuous batching: a six-token request for another adapter, sent while a 1000-token
    request decodes, is answered (as it is answered alone) while the long one still runs, and the
    long one's text goes on as it does alone. (The base's answer to QUESTIONS[1] repeats itself
    with no end token: it runs to its length.)"""
    engine = _engine(store, tiny_chat_path, tmp_path)
    long_tokens = 1000

    async def scenario() -> None:
        short_alone, _ = await _collect(_submit(engine, 0, QUESTIONS[0]))  # loads the base and adapter 0
        long_alone, usage = await _collect(_submit(engine, None, QUESTIONS[1], max_tokens=60))
        assert usage["completion_tokens"] == 60
        runner = engine.runners[f"base:{BASE}"]

        long = _submit(engine, None, QUESTIONS[1], max_tokens=long_tokens)
        text = (await asyncio.wait_for(long.queue.get(), WAIT)).text  # it is decoding
        with runner.cond:  # the loop stops at its next step boundary, where requests join
            assert long.completion_tokens < long_tokens // 2, "the loop ran ahead: inconclusive"
            short = _submit(engine, 0, QUESTIONS[0])
        texts, _ = await _collect(short)
        assert texts == short_alone
        assert long.open_rows > 0 and long.completion_tokens < long_tokens
        while len(text) < len(long_alone[0]):
            event: Event = await asyncio.wait_for(long.queue.get(), WAIT)
            assert event.kind == "delta"
            text += event.text
        assert text.startswith(long_alone[0])
        long.cancel()

    asyncio.run(scenario())


def test_fully_fine_tuned_models_beyond_the_limit_are_unloaded(
    store: FilesystemStore, tiny_chat_path: Path, tmp_path: Path
) -> None:
    """Each full fine-tune is a whole model in memory: past `full_models` the least recently used
    idle one is unloaded (its loop ends), and asked again it is loaded again and answers as before."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for k in range(2):
        torch.manual_seed(200 + k)
        model = AutoModelForCausalLM.from_pretrained(tiny_chat_path)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        out = tmp_path / f"full{k}"
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(tiny_chat_path).save_pretrained(out)
        archive = tmp_path / f"full{k}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(out.iterdir()):
                tar.add(path, arcname=path.name)
        store.put_file(f"jobs/full{k}/artifacts/model.tar.gz", archive)
    engine = Engine(
        lambda model_id: tiny_chat_path,
        AdapterFetcher(store, tmp_path / "cache"),
        adapters_per_base=4,
        max_batch=32,
        max_queued=64,
        timeout_seconds=WAIT,
        full_models=1,
    )

    def ask(k: int) -> Generation:
        route = Route(
            base_model=BASE,
            adapter=AdapterRef(storage_key=f"jobs/full{k}/artifacts/model.tar.gz", kind="model"),
        )
        sampling = Sampling(max_tokens=6, temperature=0.0)
        return engine.submit(route, sampling, n=1, messages=[{"role": "user", "content": QUESTIONS[0]}])

    async def scenario() -> None:
        first, _ = await _collect(ask(0))
        first_runner = engine.runners["model:jobs/full0/artifacts/model.tar.gz"]
        second, _ = await _collect(ask(1))  # full0 was idle: unloaded when full1 was asked for
        assert [key for key in engine.runners if key.startswith("model:")] == [
            "model:jobs/full1/artifacts/model.tar.gz"
        ]
        first_runner.thread.join(WAIT)
        assert not first_runner.thread.is_alive() and first_runner.model is None
        again, _ = await _collect(ask(0))
        assert again == first and second != first
        assert [key for key in engine.runners if key.startswith("model:")] == [
            "model:jobs/full0/artifacts/model.tar.gz"
        ]

    asyncio.run(scenario())
