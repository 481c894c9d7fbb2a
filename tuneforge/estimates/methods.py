"""What a training method adds to the memory of a supervised run of the same model and batch.

- Pairs (dpo, orpo, simpo, reward_model): TRL runs the chosen and the rejected answer of every
  pair through the model in one concatenated batch, so a micro-batch of N pairs holds the
  activations of 2N sequences.
- A reference model (dpo, kto): adapter runs use the base with the adapter switched off (no extra
  weights); full fine-tuning keeps a frozen copy of the base in the compute dtype.
- kto: one sequence per line; its KL term is a second, gradient-free forward of mismatched
  completions (no activations kept). orpo and simpo need no reference model at all.
- reward_model: the output is a one-logit score head instead of the vocabulary, so the pairs'
  estimate is an upper bound on the head's share.
- reinforcement (GRPO, tuneforge.training.grpo): every prompt of a micro-batch is answered
  `num_generations` times (the recipe's rule: auto is 4 x compute_multiplier, at least 2) with up
  to `max_new_tokens` tokens, and the answers train in one batch: `sampling` gives the sequences
  and their length, `for_method` the rest. TRL computes logits for the answer's tokens only.
  Generation (no gradients) keeps a KV cache for a whole generation batch (micro-batch x gradient
  accumulation steps); it is freed before the backward pass, so the larger of the two counts. The
  KL term's reference is as for dpo, and there is none with `beta` 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.estimates.memory import DTYPE_BYTES, MemoryBreakdown
from tuneforge.estimates.skeleton import ModelShape
from tuneforge.models.spec import Hyperparameters, ReinforcementHyperparameters

PAIRED = frozenset({"dpo", "orpo", "simpo", "reward_model"})
WITH_REFERENCE = frozenset({"dpo", "kto"})


@dataclass(frozen=True)
class Sampling:
    """What one GRPO micro-batch of `prompts` prompts holds, as the recipe would run it."""

    generations: int  # answers per prompt
    max_new_tokens: int
    beta: float  # 0: no KL reference model
    prompts: int
    prompt_tokens: int  # the longest prompt counted (max_seq_length; longer ones are reported)
    accumulation: int  # micro-batches generated at once (TRL's steps_per_generation)

    @property
    def sequences(self) -> int:
        return self.prompts * self.generations

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    @property
    def logit_tokens(self) -> int:
        """TRL asks for the answer's logits plus one (logits_to_keep + 1)."""
        return self.max_new_tokens + 1


def sampling(hp: Hyperparameters, *, prompts: int, seq_len: int, accumulation: int) -> Sampling:
    """The reinforcement recipe's own resolution of `hp` (tuneforge.training.grpo)."""
    from tuneforge.training.grpo import kl_beta, num_generations  # imports torch: not at API start

    rft = hp if isinstance(hp, ReinforcementHyperparameters) else ReinforcementHyperparameters()
    return Sampling(
        generations=num_generations(rft),
        max_new_tokens=rft.max_new_tokens,
        beta=kl_beta(rft),
        prompts=prompts,
        prompt_tokens=seq_len,
        accumulation=accumulation,
    )


def for_method(
    memory: MemoryBreakdown,
    shape: ModelShape,
    *,
    method: str,
    adapter_type: str,
    dtype: str,
    rft: Sampling | None = None,
) -> MemoryBreakdown:
    """`memory` (a supervised run's; for reinforcement, already of `rft`'s sequences) with what
    `method` adds; unchanged for supervised and pretraining."""
    weights, activations, notes = memory.weights, memory.activations, list(memory.notes)
    if method in PAIRED:
        activations *= 2
        notes.append(f"{method}: chosen and rejected answers in one forward, activations x2")
    reference = method in WITH_REFERENCE
    if method == "reinforcement" and rft is not None:
        notes.append(
            f"reinforcement: {rft.generations} sampled answers per prompt of up to "
            f"{rft.max_new_tokens} tokens train in one batch ({rft.sequences} sequences of up to "
            f"{rft.tokens} tokens per micro-batch)"
        )
        kv_width = shape.num_kv_heads * shape.head_dim
        cache = 2 * shape.num_layers * kv_width * DTYPE_BYTES[dtype] * rft.tokens
        cache *= rft.sequences * rft.accumulation
        if cache > activations:
            notes.append(
                f"reinforcement: generation's KV cache for {rft.sequences * rft.accumulation} answers "
                f"({cache:,} bytes) outweighs the training activations"
            )
            activations = cache
        else:
            notes.append(
                f"reinforcement: generation's KV cache ({cache:,} bytes) is freed before the backward pass"
            )
        reference = rft.beta > 0
        if not reference:
            notes.append("reinforcement: beta 0, no KL reference model")
    if reference:
        if adapter_type == "full":
            copy = shape.total_params * DTYPE_BYTES[dtype]
            weights += copy
            notes.append(f"{method}: a frozen reference copy of the base ({copy:,} bytes in {dtype})")
        else:
            notes.append(
                f"{method}: the reference is the base with the adapter switched off (no extra weights)"
            )
    if method == "kto":
        notes.append("kto: one sequence per line; the KL term's forward keeps no activations")
    if method in ("orpo", "simpo"):
        notes.append(f"{method}: no reference model")
    if method == "reward_model":
        notes.append("reward_model: a one-logit score head instead of the vocabulary (an upper bound)")
    return MemoryBreakdown(
        weights=weights,
        gradients=memory.gradients,
        optimizer=memory.optimizer,
        activations=activations,
        notes=notes,
    )
