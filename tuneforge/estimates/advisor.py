"""The method advisor: which method and adapter suit the data and the hardware, with reasons in
words, and which changes would make a job that does not fit the device fit it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tuneforge.estimates.schema import Recommendation
from tuneforge.models.spec import AdapterSpec, MethodType

GIB = 2**30
FEW_EXAMPLES = 1_000
MANY_EXAMPLES = 100_000
PREFERENCE_FORMATS = frozenset({"preference_openai", "preference"})  # tuneforge.training.formats.DataFormat
#: The advisor's table for the methods beyond DPO: stages and why (docs/estimates.md, "The advisor").
METHOD_STAGES: dict[str, tuple[list[MethodType], str]] = {
    "orpo": (
        ["orpo"],
        "orpo: one stage on the pairs; its SFT term on the chosen answers replaces the supervised "
        "stage, and it needs no reference model (no second copy in memory for full fine-tuning)",
    ),
    "simpo": (
        ["supervised", "simpo"],
        "simpo: supervised on the preferred answers first, then SimPO on the pairs; no reference model, "
        "a length-normalised reward with a target margin (gamma)",
    ),
    "kto": (
        ["supervised", "kto"],
        "unpaired feedback (thumbs up/down): supervised on the desirable answers first, then KTO on "
        "every line; it needs no pairs, and batch_size >= 2 for its KL term",
    ),
    "reward_model": (
        ["reward_model"],
        "reward_model: a score head trained on the pairs (Bradley-Terry); the artifact scores answers "
        "for ranking, filtering or RL, it does not generate",
    ),
    "reinforcement": (
        ["reinforcement"],
        "reinforcement (GRPO): one stage on the prompts; each is answered num_generations times and "
        "the grader's scores move the model towards the better answers of each group, so it learns "
        "only where some answers already score above others: start from a model (an ft: one after a "
        "supervised stage on demonstrations) that gets the task right some of the time; memory holds "
        "the sampled answers' activations and, for full fine-tuning, a frozen reference copy",
    ),
}
#: Files whose format only one method reads: the advisor takes that method's row.
FORMAT_METHODS: dict[str, str] = {"kto": "kto", "kto_chat": "kto", "reinforcement": "reinforcement"}


@dataclass(frozen=True)
class Variant:
    """A change to the job, described in words, and what it changes."""

    label: str
    adapter: AdapterSpec
    gradient_checkpointing: bool
    batch_size: int
    gradient_accumulation_steps: int
    seq_len: int


#: Total bytes for a variant of the job.
Sizer = Callable[[Variant], int]


def _gib(n: int) -> str:
    return f"{n / GIB:,.1f} GiB"


def fit_advice(current: Variant, size: Sizer, usable: int) -> list[str]:
    """Changes, simplest first, that bring the total under the usable device memory."""
    candidates: list[Variant] = []

    def change(label: str, **kw: object) -> None:
        base = dict(
            adapter=current.adapter,
            gradient_checkpointing=current.gradient_checkpointing,
            batch_size=current.batch_size,
            gradient_accumulation_steps=current.gradient_accumulation_steps,
            seq_len=current.seq_len,
        )
        base.update(kw)
        candidates.append(Variant(label=label, **base))  # type: ignore[arg-type]

    if not current.gradient_checkpointing:
        change("turn on gradient checkpointing", gradient_checkpointing=True)
    kind = current.adapter.type
    lora_like = current.adapter if kind in ("lora", "dora") else AdapterSpec()
    if kind in ("lora", "dora"):
        change(f"use qlora instead of {kind}", adapter=current.adapter.model_copy(update={"type": "qlora"}))
    if kind == "full":
        change("use lora instead of full fine-tuning", adapter=lora_like)
        change(
            "use qlora instead of full fine-tuning", adapter=lora_like.model_copy(update={"type": "qlora"})
        )
    batch, accumulation = current.batch_size, current.gradient_accumulation_steps
    while batch > 1:
        batch //= 2
        accumulation *= 2
        change(
            f"batch_size {batch} with gradient_accumulation_steps {accumulation} (same examples per step)",
            batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
    if current.seq_len > 512:
        change(f"max_seq_length {current.seq_len // 2}", seq_len=current.seq_len // 2)
    small = (
        lora_like.model_copy(update={"type": "qlora"})
        if kind not in ("prefix_tuning", "prompt_tuning", "ia3")
        else current.adapter
    )
    change(
        "qlora with gradient checkpointing and batch_size 1",
        adapter=small,
        gradient_checkpointing=True,
        batch_size=1,
        gradient_accumulation_steps=current.batch_size * current.gradient_accumulation_steps,
    )
    advice: list[str] = []
    smallest: tuple[int, str] | None = None
    for variant in candidates:
        total = size(variant)
        if smallest is None or total < smallest[0]:
            smallest = (total, variant.label)
        if total <= usable:
            advice.append(f"{variant.label}: {_gib(total)} (fits {_gib(usable)} usable)")
            if len(advice) >= 4:
                break
    if not advice and smallest is not None:
        advice.append(
            f"no single change fits {_gib(usable)} usable; the smallest, {smallest[1]}, needs "
            f"{_gib(smallest[0])}: use a device with more memory or a smaller model"
        )
    return advice


def recommend(
    *,
    method: MethodType,
    data_format: str | None,
    domain_shift: bool,
    n_examples: int | None,
    current: Variant,
    size: Sizer,
    usable: int | None,
) -> Recommendation:
    reasons: list[str] = []
    preference = method == "dpo" or (data_format is not None and data_format in PREFERENCE_FORMATS)
    stages: list[MethodType]
    if method in METHOD_STAGES:  # the preference, reward and reinforcement methods of issue 9
        stages, reason = METHOD_STAGES[method]
        reasons.append(reason)
    elif data_format is not None and data_format in FORMAT_METHODS:
        stages, reason = METHOD_STAGES[FORMAT_METHODS[data_format]]
        reasons.append(reason)
    elif preference:
        stages = ["supervised", "dpo"]
        reasons.append(
            "preference data: train supervised on the preferred answers first, then DPO on the pairs; "
            "DPO moves a policy that already speaks the format"
        )
    elif domain_shift or method == "pretraining":
        stages = ["pretraining", "supervised"]
        reasons.append(
            "a new domain: continued pre-training on raw text teaches its vocabulary and facts, then "
            "supervised fine-tuning teaches the task"
        )
    else:
        stages = ["supervised"]

    def fits(adapter: AdapterSpec, checkpointing: bool = current.gradient_checkpointing) -> bool | None:
        if usable is None:
            return None
        variant = Variant(
            "",
            adapter,
            checkpointing,
            current.batch_size,
            current.gradient_accumulation_steps,
            current.seq_len,
        )
        return size(variant) <= usable

    lora = current.adapter if current.adapter.type in ("lora", "dora") else AdapterSpec()
    qlora = lora.model_copy(update={"type": "qlora"})
    adapter: str
    if n_examples is None:
        reasons.append(
            "the number of examples is unknown (give training_file or n_examples); judged on hardware only"
        )
    if n_examples is not None and n_examples < FEW_EXAMPLES:
        adapter = "prompt_tuning"
        reasons.append(
            f"{n_examples:,} examples is few (< {FEW_EXAMPLES:,}): prompt tuning trains a handful of "
            "virtual tokens (or use a frozen base with a small head), so it cannot overfit the way a "
            "full or LoRA run would"
        )
    elif n_examples is not None and n_examples > MANY_EXAMPLES and fits(AdapterSpec(type="full")) is True:
        adapter = "full"
        reasons.append(
            f"{n_examples:,} examples (> {MANY_EXAMPLES:,}) and full fine-tuning fits the hardware: "
            "enough data to move every weight, which adapters cannot match at this scale"
        )
    else:
        if n_examples is not None and n_examples > MANY_EXAMPLES:
            reasons.append(
                f"{n_examples:,} examples would justify full fine-tuning, but "
                + ("no hardware was given" if usable is None else "it does not fit the hardware")
            )
        elif n_examples is not None:
            reasons.append(f"{n_examples:,} examples: enough for a low-rank adapter")
        lora_fits = fits(lora)
        if lora_fits is False and fits(qlora) is not False:
            adapter = "qlora"
            reasons.append("LoRA does not fit the device; QLoRA keeps the base in 4 bits and does")
        elif lora_fits is False:
            adapter = "qlora"
            reasons.append("neither LoRA nor QLoRA fits as asked; see fit_advice")
        else:
            adapter = lora.type
            reasons.append(
                "LoRA fits"
                + ("" if usable is not None else " (no hardware given to check)")
                + ": trains well under 1% of the weights at full precision, no quantization error"
            )
    advice: list[str] = []
    if usable is not None and size(current) > usable:
        advice = fit_advice(current, size, usable)
    return Recommendation(
        method=stages[0], adapter=adapter, stages=list(stages), reasons=reasons, fit_advice=advice
    )
