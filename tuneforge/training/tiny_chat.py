"""`tuneforge/tiny-chat`: a Llama-architecture chat model of about 2.9M parameters, built offline.

The tokenizer is a byte-level BPE trained on the corpus kept beside this file; the weights are a
seeded random initialisation. Same seed and corpus give the same bytes, so a build can be cached
and checked. The chat template marks assistant turns with `{% generation %}` (end-of-turn token
inside) so TRL's `assistant_only_loss` works, and leaves an assistant turn with `weight: 0` outside
the markers, so OpenAI's weight is honoured.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MODEL_ID = "tuneforge/tiny-chat"
BUILD_VERSION = 1
SEED = 1234
CORPUS = Path(__file__).with_name("corpus") / "tiny_chat_corpus.txt"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<|end_of_text|>"]

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' and message.get('weight', 1) != 0 -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def build_fingerprint() -> str:
    """Changes whenever anything that decides the built bytes changes."""
    digest = hashlib.sha256()
    digest.update(json.dumps([BUILD_VERSION, SEED, VOCAB_SIZE, SPECIAL_TOKENS, ARCHITECTURE]).encode())
    digest.update(CHAT_TEMPLATE.encode())
    digest.update(CORPUS.read_bytes())
    return digest.hexdigest()[:16]


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.read_text().splitlines()
    tokenizer.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=ARCHITECTURE["max_position_embeddings"],
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _build_weights(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCHITECTURE,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(out)


def build_tiny_chat(models_dir: Path) -> Path:
    """The model directory, built on first use and reused while the fingerprint matches.

    Safe when several processes ask at once: one builds under a file lock, the others wait.
    """
    fingerprint = build_fingerprint()
    target = models_dir / "tuneforge--tiny-chat"
    stamp = target / "tuneforge_build.json"
    if _is_built(stamp, fingerprint):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with (models_dir / ".tiny-chat.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_built(stamp, fingerprint):
            return target
        staging = models_dir / f".tiny-chat-build-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _train_tokenizer(staging)
        _build_weights(staging)
        (staging / "tuneforge_build.json").write_text(
            json.dumps({"model": MODEL_ID, "fingerprint": fingerprint, "seed": SEED})
        )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _is_built(stamp: Path, fingerprint: str) -> bool:
    try:
        return bool(json.loads(stamp.read_text()).get("fingerprint") == fingerprint)
    except (OSError, ValueError):
        return False
