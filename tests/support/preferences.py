"""Preference data a tiny model can generalise, and the margin that says it learned it.

Shared by the in-process training tests and the SDK tests of issue 9's preference and reward
methods: pairs prefer a helpful sentence about a thing over a refusal; the last 8 things are held
out (never trained on) so a raised margin on them is generalisation, not memory.
"""

from __future__ import annotations

from typing import Any

THINGS = [
    "apples", "rivers", "stars", "clocks", "horses", "bridges", "candles", "forests",
    "mirrors", "rockets", "gardens", "pianos", "islands", "lamps", "oceans", "towers",
    "wolves", "books", "clouds", "ships", "stones", "trains", "flowers", "kites",
    "dragons", "engines", "spoons", "rabbits", "violins", "tables", "comets", "maps",
]  # fmt: skip
TRAIN, HELD_OUT = THINGS[:24], THINGS[24:]


def preference_pair(thing: str) -> dict[str, Any]:
    """One line of OpenAI's preference format: a fact about the thing preferred over a refusal."""
    return {
        "input": {"messages": [{"role": "user", "content": f"Tell me about {thing}."}]},
        "preferred_output": [{"role": "assistant", "content": f"Here is a fact about {thing}."}],
        "non_preferred_output": [{"role": "assistant", "content": "No. Go away."}],
    }


def feedback_lines(thing: str) -> list[dict[str, Any]]:
    """The same preference as two KTO chat lines: the fact labelled desirable, the refusal not."""
    pair = preference_pair(thing)
    prompt = pair["input"]["messages"]
    return [
        {"messages": prompt + pair["preferred_output"], "label": True},
        {"messages": prompt + pair["non_preferred_output"], "label": False},
    ]


def mean_margin(model: Any, tokenizer: Any, pairs: list[dict[str, Any]]) -> float:
    """Mean over pairs (`read_training_file(..., "dpo", ...)` rows) of log p(chosen | prompt) -
    log p(rejected | prompt), summed over the answer tokens."""
    import torch

    model.eval()

    def logp(prompt: list[dict[str, str]], answer: list[dict[str, str]]) -> float:
        head = tokenizer.apply_chat_template(
            prompt, tokenize=True, return_dict=True, add_generation_prompt=True
        )
        whole = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)
        ids = torch.tensor([whole["input_ids"]])
        start = len(head["input_ids"])
        logits = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
        targets = ids[0, 1:]
        token_logps = logits.gather(-1, targets[:, None])[:, 0]
        return float(token_logps[start - 1 :].sum())

    with torch.no_grad():
        margins = [logp(p["prompt"], p["chosen"]) - logp(p["prompt"], p["rejected"]) for p in pairs]
    return sum(margins) / len(margins)
