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
- reinforcement (GRPO, tuneforge.training.grpo): every prompt of a step is answered
  `num_generations` times (auto: 4) and the answers train in one batch, so activations are those
  of GENERATIONS sequences per example; the KL term's reference is as for dpo (beta auto is > 0).
"""

from __future__ import annotations

from tuneforge.estimates.memory import DTYPE_BYTES, MemoryBreakdown
from tuneforge.estimates.skeleton import ModelShape

PAIRED = frozenset({"dpo", "orpo", "simpo", "reward_model"})
WITH_REFERENCE = frozenset({"dpo", "kto", "reinforcement"})
#: Answers sampled per prompt by a reinforcement run with num_generations "auto".
GENERATIONS = 4


def for_method(
    memory: MemoryBreakdown, shape: ModelShape, *, method: str, adapter_type: str, dtype: str
) -> MemoryBreakdown:
    """`memory` (a supervised run's) with what `method` adds; unchanged for supervised and
    pretraining."""
    weights, activations, notes = memory.weights, memory.activations, list(memory.notes)
    if method in PAIRED:
        activations *= 2
        notes.append(f"{method}: chosen and rejected answers in one forward, activations x2")
    if method == "reinforcement":
        activations *= GENERATIONS
        notes.append(
            f"reinforcement: {GENERATIONS} sampled answers per prompt train in one batch, activations "
            f"x{GENERATIONS} (plus their generation's KV cache, freed before the backward pass)"
        )
    if method in WITH_REFERENCE:
        if adapter_type == "full":
            reference = shape.total_params * DTYPE_BYTES[dtype]
            weights += reference
            notes.append(f"{method}: a frozen reference copy of the base ({reference:,} bytes in {dtype})")
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
