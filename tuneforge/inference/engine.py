"""The decoding engine: one thread per base model runs batches of sequences, whatever adapters
they ask for, through PEFT's mixed-adapter batches (`adapter_names=`, one name per row, `__base__`
for the plain base).

A request's adapter is fetched and read (download, unpack, tokenizer) by a loader thread while the
base's loop keeps serving the adapters it has; the loop then inserts it into the model between two
decoding steps, so a new adapter holds up the others for no longer than that insertion. Each base
keeps at most `adapters_per_base` adapters; the least recently used one that no waiting or running
request needs goes first.

Batching is continuous: the loop takes every waiting sequence whose adapter is ready (up to
`max_batch`), prefills them together (left-padded), then decodes one token per row per step;
between two steps, requests that arrived meanwhile are prefilled and join the batch (their KV
cache and mask left-padded to its length); finished, cancelled and timed-out rows leave the batch
(and the KV cache) as they end. A short request thus waits for one step, not for the batch's
longest row.

IA3, prompt tuning and prefix tuning adapters can share neither PEFT's mixed LoRA batch nor a
model that has LoRA layers in it (PEFT keeps one adapter method per model), so each of these
methods gets a runner of its own per base (its own copy of the base weights, loaded on first use),
whose batches hold one adapter each. Prompt-learning adapters add their virtual tokens once, as
training computes them: prompt tuning's embeddings before the (left-padded) prompt, prefix tuning's keys
and values as the start of the KV cache; either way the prompt's positions start after them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.inference.adapters import AdapterFetcher, cache_name
from tuneforge.inference.protocol import AdapterFamily, Route
from tuneforge.models.spec import PROMPT_LEARNING_ADAPTERS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
PEFT_TYPES: dict[str, str] = {
    "lora": "LORA",
    "ia3": "IA3",
    "prompt_tuning": "PROMPT_TUNING",
    "prefix_tuning": "PREFIX_TUNING",
}
"""The `peft_type` an adapter of each family has in its adapter_config.json."""


class EngineError(Exception):
    """An answer other than a completion, in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, *, code: str, param: str | None = None, type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Event:
    """What a request's reader receives: `delta` (text of one choice), `finish` (one choice ended),
    `done` (all ended; usage), `error`."""

    kind: str
    index: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: EngineError | None = None


@dataclass
class Generation:
    """One request: `n` sequences for each prompt, its events pushed onto an asyncio queue of the
    server's loop. `messages` (chat) or `prompts` (completions) are tokenized once its adapter
    (and so its chat template) is ready."""

    route: Route
    sampling: Sampling
    n: int
    messages: list[dict[str, Any]] | None
    prompts: list[str] | None
    loop: asyncio.AbstractEventLoop
    deadline: float
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_tokens: int = 0
    open_rows: int = 0
    release: Callable[[Generation], None] | None = None
    """Gives the request's queue slot back (the engine's; idempotent)."""
    holds_slot: bool = False

    @property
    def sequences(self) -> int:
        return self.n * (1 if self.messages is not None else len(self.prompts or []))

    @property
    def adapter_name(self) -> str | None:
        adapter = self.route.adapter
        return cache_name(adapter.storage_key) if adapter is not None and adapter.kind == "adapter" else None

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def fail(self, error: EngineError) -> None:
        self.emit(Event("error", error=error))

    def cancel(self) -> None:
        """Stops the request (a no-op once it has ended). Its queue slot is free when this returns;
        its rows leave the batch at the decoding loop's next step."""
        self.cancelled.set()
        if self.release is not None:
            self.release(self)


@dataclass
class Tokenizing:
    """A loaded adapter's (or the base's) tokenizer and the tokens that end a turn."""

    tokenizer: PreTrainedTokenizerBase
    eos_ids: frozenset[int]


@dataclass
class _Row:
    generation: Generation
    index: int
    prompt_ids: list[int]
    adapter: str
    max_new: int
    tokenizing: Tokenizing
    generator: torch.Generator | None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RunnerStats:
    """How full a runner's forward passes (prefills and decoding steps) have been since it started,
    for operators (the engine's /healthz): `rows / forwards` is the mean batch, and `most_adapters`
    shows whether requests for different adapters (the base counts as one) shared a forward."""

    forwards: int = 0
    rows: int = 0
    most_rows: int = 0
    most_adapters: int = 0

    def record(self, adapters: list[str]) -> None:
        self.forwards += 1
        self.rows += len(adapters)
        self.most_rows = max(self.most_rows, len(adapters))
        self.most_adapters = max(self.most_adapters, len(set(adapters)))


@dataclass
class _Batch:
    """A running batch: its rows, KV cache, attention mask, each row's next position, the last
    step's logits, and the module that runs it (with `adapter_names` when `mixed`)."""

    rows: list[_Row]
    cache: Any
    mask: torch.Tensor
    next_position: torch.Tensor
    logits: torch.Tensor
    model: Any
    mixed: bool


def _eos_ids(tokenizer: PreTrainedTokenizerBase, model: Any) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids |= {int(i) for i in configured}
    return frozenset(ids)


def _load_tokenizer(directory: Path, fallback: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the weights (it carries the chat template the model trained with)."""
    from transformers import AutoTokenizer

    has_tokenizer = any((directory / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    if not has_tokenizer and fallback is not None:
        return fallback
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    if not tokenizer.chat_template and fallback is not None and fallback.chat_template:
        tokenizer.chat_template = fallback.chat_template
    return tokenizer


class BaseRunner:
    """The decoding loop of one base model (or one fully fine-tuned model) and its adapters."""

    def __init__(
        self,
        key: str,
        locate: Callable[[], Path],
        fetcher: AdapterFetcher,
        *,
        adapters_per_base: int,
        max_batch: int,
        released: Callable[[Generation], None],
        family: AdapterFamily = "lora",
    ) -> None:
        self.key = key
        self.family = family
        self.locate = locate
        self.fetcher = fetcher
        self.adapters_per_base = adapters_per_base
        self.max_batch = max_batch
        self.released = released
        self.cond = threading.Condition()
        self.pending: collections.deque[Generation] = collections.deque()
        self.ready: list[tuple[str, Path, Tokenizing]] = []  # fetched, waiting to be inserted
        self.loading: set[str] = set()
        self.storage_keys: dict[str, str] = {}  # adapter name -> its archive in the store
        self.running: set[str] = set()  # the adapters of the running batch's rows
        self.active: list[Generation] = []  # the running batch's requests, joiners included
        self.closing = False
        self.failed: dict[str, EngineError] = {}
        self.loaded: collections.OrderedDict[str, Tokenizing] = collections.OrderedDict()
        self.model: Any = None
        self.base_tokenizing: Tokenizing | None = None
        self.load_error: EngineError | None = None
        self.stats = RunnerStats()
        self.thread = threading.Thread(target=self._loop, name=f"decode-{key}", daemon=True)
        self.thread.start()

    # --- requests in ---
    def submit(self, generation: Generation) -> bool:
        """Queues a request; False once the runner is closing (the engine then makes a new one)."""
        with self.cond:
            if self.closing:
                return False
            self.pending.append(generation)
            self.cond.notify()
            return True

    def close(self) -> bool:
        """Stops the loop and lets its model go, if it has nothing to do (else False)."""
        with self.cond:
            busy = self.pending or self.ready or self.loading or any(g.holds_slot for g in self.active)
            if busy:
                return False
            self.closing = True
            self.cond.notify()
            return True

    # --- the loop ---
    def _loop(self) -> None:
        try:
            self._load_base()
        except Exception as exc:
            log.exception("loading base model %s failed", self.key)
            self.load_error = EngineError(
                503, f"The model could not be loaded: {type(exc).__name__}", code="model_unavailable"
            )
        while True:
            with self.cond:
                while not self.pending and not self.ready:
                    if self.closing:
                        self.model = None
                        self.loaded.clear()
                        return
                    self.cond.wait()
                ready, self.ready = self.ready, []
            for name, directory, tokenizing in ready:
                self._insert(name, directory, tokenizing)
            batch = self._admit()
            if batch:
                try:
                    self._decode(batch)
                except Exception as exc:  # a bug must not kill the loop: fail the batch, go on
                    log.exception("decoding failed on %s", self.key)
                    for generation in self.active:
                        if generation.open_rows > 0 or generation.holds_slot:
                            self.released(generation)
                            generation.fail(
                                EngineError(
                                    500, f"Generation failed: {type(exc).__name__}", code="server_error"
                                )
                            )
                self.active = []
                self._evict()
            elif not ready:
                with self.cond:  # only waiting for loads: sleep until one finishes or a request comes
                    if not self.ready:
                        self.cond.wait(timeout=0.5)

    def _load_base(self) -> None:
        import torch

        from tuneforge.training.loading import detect_device, load_model

        device = detect_device()
        path = self.locate()
        model: Any = load_model(path, device)
        if device.cuda:
            model = model.to("cuda")
        model.eval()
        torch.set_grad_enabled(False)
        self.device = "cuda" if device.cuda else "cpu"
        tokenizer = _load_tokenizer(path, None)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.base_tokenizing = Tokenizing(tokenizer, _eos_ids(tokenizer, model))

    def _admit(self, room: int | None = None, adapter: str | None = None) -> list[Generation]:
        """Takes the waiting requests whose weights are ready, up to `max_batch` sequences (or,
        joining a running batch, `room` of them, and only for its `adapter` where batches hold
        one); starts fetching the adapters of the others; answers those that cannot be served."""
        batch: list[Generation] = []
        rows = 0
        now = time.monotonic()
        joining = room is not None
        room = self.max_batch if room is None else room
        with self.cond:
            waiting: collections.deque[Generation] = collections.deque()
            for generation in self.pending:
                name = generation.adapter_name
                error = self.load_error or (self.failed.get(name) if name else None)
                if generation.cancelled.is_set():
                    self.released(generation)
                elif error is not None or now > generation.deadline:
                    self.released(generation)
                    generation.fail(error or _timeout())
                elif name is not None and name not in self.loaded:
                    if name not in self.loading:
                        self._start_fetch(generation)
                    waiting.append(generation)
                elif (batch or joining) and (
                    rows + generation.sequences > room
                    or (self.family != "lora" and name != (adapter if joining else batch[0].adapter_name))
                ):
                    waiting.append(generation)
                else:
                    if name is not None:
                        self.loaded.move_to_end(name)
                    batch.append(generation)
                    rows += generation.sequences
            self.pending = waiting
            # A failed fetch was answered to the requests that waited for it; the next one retries.
            for name in set(self.failed) - {g.adapter_name for g in waiting}:
                del self.failed[name]
        admitted = []
        for generation in batch:
            try:
                self._tokenize(generation)
            except EngineError as exc:
                self.released(generation)
                generation.fail(exc)
            else:
                admitted.append(generation)
        return admitted

    def _start_fetch(self, generation: Generation) -> None:
        assert generation.route.adapter is not None
        name = generation.adapter_name
        assert name is not None
        self.loading.add(name)
        key = generation.route.adapter.storage_key
        self.storage_keys[name] = key
        threading.Thread(target=self._fetch, args=(name, key), name=f"fetch-{name}", daemon=True).start()

    def _fetch(self, name: str, storage_key: str) -> None:
        try:
            directory = self.fetcher.fetch(storage_key)
            config = directory / "adapter_config.json"
            import json

            peft_type = json.loads(config.read_text()).get("peft_type") if config.exists() else None
            if peft_type != PEFT_TYPES[self.family]:
                raise EngineError(
                    400,
                    f"This model's adapter ({peft_type or 'unknown type'}) cannot be served; LoRA, DoRA, "
                    "QLoRA, IA3, prompt tuning and prefix tuning adapters and full fine-tunes can.",
                    code="model_not_supported",
                    param="model",
                )
            base = self.base_tokenizing
            tokenizer = _load_tokenizer(directory, base.tokenizer if base else None)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizing = Tokenizing(
                tokenizer, _eos_ids(tokenizer, self.model) | (base.eos_ids if base else set())
            )
        except EngineError as exc:
            failure = exc
        except Exception as exc:
            log.exception("fetching adapter %s failed", storage_key)
            failure = EngineError(
                503, f"The adapter could not be loaded: {type(exc).__name__}", code="model_unavailable"
            )
        else:
            with self.cond:
                self.ready.append((name, directory, tokenizing))
                self.cond.notify()
            return
        with self.cond:
            self.loading.discard(name)
            self.failed[name] = failure
            self.cond.notify()

    def _insert(self, name: str, directory: Path, tokenizing: Tokenizing) -> None:
        from peft import PeftModel

        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(directory), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(directory), adapter_name=name)
            self.model.eval()
        except Exception as exc:
            log.exception("inserting adapter %s failed", name)
            with self.cond:
                self.loading.discard(name)
                self.failed[name] = EngineError(
                    400,
                    f"The adapter does not fit its base model: {type(exc).__name__}",
                    code="model_not_supported",
                )
            return
        with self.cond:
            self.loading.discard(name)
            self.loaded[name] = tokenizing
        self._evict()

    def _evict(self) -> None:
        """Unloads the least recently used adapters beyond `adapters_per_base` that no waiting
        request needs, and deletes their unpacked files (the store keeps the archive). Runs on the
        loop between batches: after an insertion, and after a batch, since adapters that were all
        needed at once may outnumber the limit until their requests are done."""
        with self.cond:
            needed = {g.adapter_name for g in self.pending} | self.running
            evicted = []
            for old in list(self.loaded):
                if len(self.loaded) <= self.adapters_per_base:
                    break
                if old not in needed:
                    self.model.delete_adapter(old)
                    del self.loaded[old]
                    evicted.append(self.storage_keys.pop(old))
        for storage_key in evicted:
            self.fetcher.discard(storage_key)

    def _tokenize(self, generation: Generation) -> None:
        name = generation.adapter_name
        tokenizing = self.loaded[name] if name is not None else self.base_tokenizing
        assert tokenizing is not None
        tokenizer = tokenizing.tokenizer
        if generation.messages is not None:
            if not tokenizer.chat_template:
                raise EngineError(
                    400,
                    "This model has no chat template; use /v1/completions.",
                    code="model_not_supported",
                    param="model",
                )
            text = tokenizer.apply_chat_template(
                generation.messages, tokenize=False, add_generation_prompt=True
            )
            texts = [str(text)]
        else:
            texts = list(generation.prompts or [])
        limit = self._context_limit() - self._virtual_tokens(name)
        generation.prompt_ids = []
        for text in texts:
            ids = list(tokenizer(text, add_special_tokens=generation.messages is None)["input_ids"])
            if not ids:
                ids = [
                    tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
                ]
            if len(ids) >= limit:
                raise EngineError(
                    400,
                    f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)}.",
                    code="context_length_exceeded",
                    param="messages" if generation.messages is not None else "prompt",
                )
            generation.prompt_ids.append(ids)

    def _context_limit(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def _virtual_tokens(self, name: str | None) -> int:
        """The virtual tokens a prompt-learning adapter puts before the prompt (0 for the others)."""
        if name is None or self.family not in PROMPT_LEARNING_ADAPTERS:
            return 0
        return int(self.model.peft_config[name].num_virtual_tokens)

    # --- decoding ---
    def _rows(self, batch: list[Generation]) -> list[_Row]:
        import torch

        rows = []
        for generation in batch:
            name = generation.adapter_name
            limit = self._context_limit() - self._virtual_tokens(name)
            tokenizing = self.loaded[name] if name is not None else self.base_tokenizing
            assert tokenizing is not None
            sampling = generation.sampling
            for p, ids in enumerate(generation.prompt_ids):
                for j in range(generation.n):
                    room = limit - len(ids)
                    max_new = min(sampling.max_tokens, room) if sampling.max_tokens else room
                    generator = None
                    if sampling.seed is not None and sampling.temperature > 0:
                        generator = torch.Generator(device=self.device).manual_seed(sampling.seed + j)
                    rows.append(
                        _Row(
                            generation,
                            p * generation.n + j,
                            ids,
                            name or BASE_ADAPTER,
                            max_new,
                            tokenizing,
                            generator,
                        )
                    )
            generation.open_rows = len(generation.prompt_ids) * generation.n
        return rows

    def _decode(self, batch: list[Generation]) -> None:
        import torch

        state = self._prefill(batch)
        try:
            while True:
                self._join(state)
                rows = state.rows
                tokens = self._sample(rows, state.logits.float())
                keep = [i for i, row in enumerate(rows) if self._advance(row, tokens[i])]
                if not keep:
                    return
                if len(keep) < len(rows):
                    index = torch.tensor(keep, device=self.device)
                    state.cache.batch_select_indices(index)
                    state.rows = rows = [rows[i] for i in keep]
                    tokens, state.mask = tokens[index], state.mask[index]
                    state.next_position = state.next_position[index]
                ones = torch.ones((len(rows), 1), dtype=state.mask.dtype, device=self.device)
                state.mask = torch.cat([state.mask, ones], dim=1)
                extra = {"adapter_names": [r.adapter for r in rows]} if state.mixed else {}
                state.logits = state.model(
                    input_ids=tokens[:, None],
                    attention_mask=state.mask,
                    position_ids=state.next_position[:, None],
                    cache=state.cache,
                    use_cache=True,
                    **extra,
                ).logits[:, -1, :]
                self.stats.record([r.adapter for r in rows])
                state.next_position = state.next_position + 1
        finally:
            self.running = set()

    def _prefill(self, batch: list[Generation]) -> _Batch:
        """The batch's prompts through the model: its KV cache and each row's next-token logits."""
        import torch
        from peft import PeftModel

        from tuneforge.training import generation

        self.active.extend(batch)
        rows = self._rows(batch)
        pad = self.base_tokenizing.tokenizer.pad_token_id if self.base_tokenizing else 0
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), int(pad or 0), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        extra: dict[str, Any] = {}
        mixed = self.family == "lora" and isinstance(self.model, PeftModel)
        if mixed:
            extra["adapter_names"] = [r.adapter for r in rows]
        elif self.family != "lora":
            self.model.set_adapter(rows[0].adapter)  # a batch of these holds one adapter
        # PEFT's forward would add a prompt-learning adapter's virtual tokens at every step; added
        # here once, as its generate does, then the plain base model runs.
        begin = generation.start(self.model, ids, mask)
        logits = begin.model(
            **begin.inputs,
            attention_mask=begin.attention_mask,
            position_ids=begin.position_ids,
            cache=begin.cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        ).logits[:, -1, :]
        self.stats.record([r.adapter for r in rows])
        self.running |= {r.adapter for r in rows}
        mask = begin.attention_mask
        return _Batch(rows, begin.cache, mask, begin.next_position, logits, begin.model, mixed)

    def _join(self, state: _Batch) -> None:
        """Continuous batching: between two steps, waiting requests that fit join the running
        batch (prefilled on their own, then their KV cache and mask left-padded to the batch's
        length), so a short request does not wait for the longest row of the batch before it.
        New LoRA adapters are inserted here too once the model holds adapters (inserting one
        leaves the others' rows as they are). Requests wait for the batch's end instead where that
        is needed: while an adapter waits that can only be inserted between batches, while
        requests for another adapter wait on a one-adapter-per-batch runner (no starvation), and
        for caches other than plain dynamic layers (sliding windows)."""
        import torch
        from peft import PeftModel
        from transformers.cache_utils import DynamicLayer

        room = self.max_batch - len(state.rows)
        if room <= 0 or not all(type(layer) is DynamicLayer for layer in state.cache.layers):
            return
        with self.cond:
            if not self.pending:
                return
            insertable = self.family == "lora" and isinstance(self.model, PeftModel)
            if self.ready and not insertable:
                return
            ready, self.ready = self.ready, []
            adapter = state.rows[0].adapter
            if self.family != "lora" and any(g.adapter_name != adapter for g in self.pending):
                return
        for name, directory, tokenizing in ready:
            self._insert(name, directory, tokenizing)
        joiners = self._admit(room=room, adapter=adapter)
        if not joiners:
            return
        new = self._prefill(joiners)
        width = max(state.mask.shape[1], new.mask.shape[1])
        for part in (state, new):
            missing = width - part.mask.shape[1]
            if missing:
                zeros = torch.zeros((part.mask.shape[0], missing), dtype=part.mask.dtype, device=self.device)
                part.mask = torch.cat([zeros, part.mask], dim=1)
                for layer in part.cache.layers:
                    assert layer.keys is not None and layer.values is not None
                    shape = (*layer.keys.shape[:2], missing, layer.keys.shape[-1])
                    layer.keys = torch.cat([layer.keys.new_zeros(shape), layer.keys], dim=-2)
                    shape = (*layer.values.shape[:2], missing, layer.values.shape[-1])
                    layer.values = torch.cat([layer.values.new_zeros(shape), layer.values], dim=-2)
        for mine, theirs in zip(state.cache.layers, new.cache.layers, strict=True):
            assert mine.keys is not None and mine.values is not None
            assert theirs.keys is not None and theirs.values is not None
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        state.rows = state.rows + new.rows
        state.mask = torch.cat([state.mask, new.mask])
        state.next_position = torch.cat([state.next_position, new.next_position])
        state.logits = torch.cat([state.logits, new.logits])

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        import torch

        greedy = logits.argmax(dim=-1)
        logprobs = (
            torch.log_softmax(logits, dim=-1) if any(r.generation.sampling.logprobs for r in rows) else None
        )
        chosen = greedy.clone()
        for i, row in enumerate(rows):
            sampling = row.generation.sampling
            if sampling.temperature > 0:
                scaled = logits[i] / sampling.temperature
                if sampling.top_p < 1.0:
                    ordered, order = torch.sort(scaled, descending=True)
                    probs = torch.softmax(ordered, dim=-1)
                    outside = probs.cumsum(-1) - probs > sampling.top_p
                    ordered[outside] = float("-inf")
                    scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, ordered)
                probs = torch.softmax(scaled, dim=-1)
                chosen[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
            if logprobs is not None and sampling.logprobs:
                token = int(chosen[i])
                decode = row.tokenizing.tokenizer.decode
                top: list[tuple[str, float]] = []
                if sampling.top_logprobs:
                    values, indices = torch.topk(logprobs[i], sampling.top_logprobs)
                    top = [(str(decode([int(t)])), float(v)) for v, t in zip(values, indices, strict=True)]
                row.pending_logprobs.append(
                    TokenLogprob(str(decode([token])), float(logprobs[i, token]), top)
                )
        return chosen

    def _advance(self, row: _Row, token_tensor: torch.Tensor) -> bool:
        """Adds one token to a row and emits what is safe to show; False when the row ended."""
        generation = row.generation
        token = int(token_tensor)
        generation.completion_tokens += 1
        if generation.cancelled.is_set() or time.monotonic() > generation.deadline:
            return self._close(row, None)
        stops = generation.sampling.stop
        if token in row.tokenizing.eos_ids:
            row.finish_reason = "stop"
        else:
            row.out_ids.append(token)
            row.text = str(row.tokenizing.tokenizer.decode(row.out_ids, skip_special_tokens=True))
            cut = min((i for i in (row.text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                row.text = row.text[:cut]
                row.finish_reason = "stop"
            elif len(row.out_ids) >= row.max_new:
                row.finish_reason = "length"
        if row.finish_reason is None:
            hold = max((len(s) for s in stops), default=1) - 1
            upto = len(row.text) - hold
            if row.text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
                upto = min(upto, len(row.text) - 1)
        else:
            upto = len(row.text)
        if upto > row.emitted:
            generation.emit(Event("delta", row.index, row.text[row.emitted : upto], row.pending_logprobs))
            row.pending_logprobs = []
            row.emitted = upto
        if row.finish_reason is None:
            return True
        if row.pending_logprobs:
            generation.emit(Event("delta", row.index, "", row.pending_logprobs))
            row.pending_logprobs = []
        generation.emit(Event("finish", row.index, finish_reason=row.finish_reason))
        return self._close(row, row.finish_reason)

    def _close(self, row: _Row, reason: str | None) -> bool:
        """Ends a row; the last of a request frees its queue slot before its final event, so that a
        client that has read the answer finds the slot free."""
        generation = row.generation
        generation.open_rows -= 1
        if generation.open_rows == 0:
            self.released(generation)
            if reason is None and not generation.cancelled.is_set():
                generation.fail(_timeout())
            elif reason is not None:
                prompt = sum(len(ids) for ids in generation.prompt_ids)
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": generation.completion_tokens,
                    "total_tokens": prompt + generation.completion_tokens,
                }
                generation.emit(Event("done", usage=usage))
        return False


def _timeout() -> EngineError:
    return EngineError(504, "The completion did not finish in time.", code="timeout", type="server_error")


class Engine:
    """Every base model's runner (one for its LoRA adapters and the base itself, one for each other
    adapter method in use), started on first use, and the queue limit over all of them."""

    def __init__(
        self,
        locate_base: Callable[[str], Path],
        fetcher: AdapterFetcher,
        *,
        adapters_per_base: int,
        max_batch: int,
        max_queued: int,
        timeout_seconds: float,
        full_models: int = 2,
    ) -> None:
        self.locate_base = locate_base
        self.full_models = full_models
        self.used: collections.OrderedDict[str, None] = collections.OrderedDict()  # full models, LRU
        self.fetcher = fetcher
        self.adapters_per_base = adapters_per_base
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.timeout_seconds = timeout_seconds
        self.runners: dict[str, BaseRunner] = {}
        self.in_flight = 0
        self.lock = threading.Lock()

    def _release(self, generation: Generation) -> None:
        """Frees a request's queue slot, once: when it ends, fails or is cancelled, whichever comes first."""
        with self.lock:
            if generation.holds_slot:
                generation.holds_slot = False
                self.in_flight -= generation.sequences

    def _runner(self, route: Route) -> BaseRunner:
        adapter = route.adapter
        family: AdapterFamily = "lora"
        if adapter is not None and adapter.kind == "model":
            key = f"model:{adapter.storage_key}"
            storage_key = adapter.storage_key

            def locate() -> Path:
                return self.fetcher.fetch(storage_key)
        else:
            if adapter is not None:
                family = adapter.family
            key = f"base:{route.base_model}" + ("" if family == "lora" else f":{family}")
            base = route.base_model

            def locate() -> Path:
                return self.locate_base(base)

        with self.lock:
            runner = self.runners.get(key)
            if runner is None or runner.closing:
                runner = self.runners[key] = BaseRunner(
                    key,
                    locate,
                    self.fetcher,
                    adapters_per_base=self.adapters_per_base,
                    max_batch=self.max_batch,
                    released=self._release,
                    family=family,
                )
            if key.startswith("model:"):
                self.used[key] = None
                self.used.move_to_end(key)
            return runner

    def _unload_full_models(self) -> None:
        """Keeps at most `full_models` fully fine-tuned models loaded: the least recently used idle
        ones go (a busy one stays until a later request finds it idle)."""
        with self.lock:
            extra = len(self.used) - self.full_models
            candidates = [(key, self.runners[key]) for key in list(self.used)[:-1]][: max(extra, 0)]
        for key, runner in candidates:
            if runner.close():  # outside the engine's lock: the loop takes its own, then ours
                with self.lock:
                    if self.runners.get(key) is runner:
                        del self.runners[key]
                        del self.used[key]

    def submit(
        self,
        route: Route,
        sampling: Sampling,
        *,
        n: int,
        messages: list[dict[str, Any]] | None = None,
        prompts: list[str] | None = None,
    ) -> Generation:
        generation = Generation(
            route,
            sampling,
            n,
            messages,
            prompts,
            asyncio.get_running_loop(),
            time.monotonic() + self.timeout_seconds,
        )
        with self.lock:
            if self.in_flight + generation.sequences > self.max_queued:
                raise EngineError(
                    429,
                    "The inference engine's queue is full; retry shortly.",
                    code="rate_limit_exceeded",
                    type="requests",
                )
            self.in_flight += generation.sequences
            generation.holds_slot = True
        generation.release = self._release
        while not self._runner(route).submit(generation):
            pass  # it was closing: the next call makes a new runner
        self._unload_full_models()
        return generation
