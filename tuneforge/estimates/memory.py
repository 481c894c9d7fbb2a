"""The memory model: bytes per device by part (weights, gradients, optimizer states, activations)
for a decoder-only transformer trained with AdamW. Formulas and their sources are in
docs/estimates.md; the activation count follows what PyTorch autograd saves for each operation of a
Hugging Face Llama-style block (Korthikanti et al. 2022 count the same way for GPT blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.estimates.skeleton import SHARED_INPUT_GROUPS, AdapterCounts, Linear, ModelShape
from tuneforge.models.spec import AdapterSpec

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAPTER_BYTES = 4  # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype=True)
ADAM_STATES = 2  # exp_avg and exp_avg_sq, in the dtype of their parameter
QUANT_BLOCK = 64  # bitsandbytes 4-bit block size
DOUBLE_QUANT_BLOCK = 256  # blocks per second-level absmax
LOGIT_COPIES = 4  # logits, log-softmax output, and the two gradients alive at the start of backward


@dataclass
class MemoryBreakdown:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def quantized_bytes(n_params: int, double_quant: bool) -> float:
    """4-bit (NF4 or FP4: same size) storage of `n_params` weights with their absmax constants."""
    blocks = n_params / QUANT_BLOCK
    # double quant: 8-bit absmax, plus an fp32 absmax and offset per 256 blocks
    constants = blocks + (blocks / DOUBLE_QUANT_BLOCK) * 8 if double_quant else blocks * 4
    return n_params * 0.5 + constants


def _groups(linears: tuple[Linear, ...]) -> list[list[Linear]]:
    groups: list[list[Linear]] = []
    shared: dict[frozenset[str], list[Linear]] = {}
    for lin in linears:
        group = next((g for g in SHARED_INPUT_GROUPS if lin.leaf in g), None)
        if group is None:
            groups.append([lin])
        elif group in shared:
            shared[group].append(lin)
        else:
            shared[group] = [lin]
            groups.append(shared[group])
    return groups


def activation_elements_per_token(
    shape: ModelShape,
    adapter: AdapterSpec,
    counts: AdapterCounts,
    *,
    seq_len: int,
    dtype_bytes: int,
    is_gpu: bool,
) -> tuple[float, float, float]:
    """Elements saved for backward per token: (one decoder layer, the output head and loss,
    one layer's checkpoint input)."""
    h = shape.hidden_size
    hq = shape.num_heads * shape.head_dim
    i = shape.intermediate_size
    full = adapter.type == "full"
    # RMSNorm/LayerNorm: the input (for the statistics), and the normalised value when its weight trains.
    norms = shape.norms_per_layer * (2 * h if full else h)
    # q and k after rotary embedding, k and v repeated to all heads when a padding mask rules out
    # SDPA's native GQA, and the attention output SDPA keeps for its backward.
    attention = 4 * hq
    # Gated MLP (SwiGLU): gate output (for SiLU), SiLU output and up output (for the product).
    mlp = 3 * i if shape.gated_mlp else i
    # A padded batch: SDPA keeps its own float copy of the (batch, 1, s, s) mask in every layer.
    mask = seq_len
    # Dropout keeps its mask: a float tensor on CPU (x * mask), a bool tensor on CUDA (native_dropout).
    dropout_mask = 1 / dtype_bytes if is_gpu else 1.0
    linear_inputs = 0.0
    groups = _groups(shape.layer_linears)
    if full:
        linear_inputs = sum(g[0].in_features for g in groups)
    elif adapter.type in ("lora", "qlora", "dora"):
        prefix = _layer_prefix(shape)
        adapted = {lin.name for lin in counts.adapted if lin.name.startswith(prefix)}
        for group in groups:
            mine = [lin for lin in group if lin.name in adapted]
            if not mine:
                continue
            if adapter.dropout > 0:  # each adapted module drops out its own copy of the input
                linear_inputs += sum(lin.in_features * (1 + dropout_mask) for lin in mine)
            else:
                linear_inputs += group[0].in_features
            linear_inputs += adapter.r * len(mine)  # lora_A output, kept for lora_B
            if adapter.type == "dora":  # base and LoRA results, kept for the magnitude's gradient
                linear_inputs += sum(2 * lin.out_features for lin in mine)
    elif adapter.type == "ia3":
        prefix = _layer_prefix(shape)
        for lin in counts.adapted:
            if lin.name.startswith(prefix):
                feedforward = lin.name in counts.feedforward
                linear_inputs += lin.in_features if feedforward else lin.out_features
    per_layer = norms + attention + mask + mlp + linear_inputs
    head = LOGIT_COPIES * shape.vocab_size + (2 * h if full else h)
    return per_layer, head, h


def _layer_prefix(shape: ModelShape) -> str:
    if not shape.layer_linears:
        return "\0"
    name = shape.layer_linears[0].name
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: k + 1]) + "."
    return "\0"


def memory_breakdown(
    shape: ModelShape,
    adapter: AdapterSpec,
    counts: AdapterCounts,
    *,
    dtype: str,
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    is_gpu: bool = True,
    head_tokens: int | None = None,
) -> MemoryBreakdown:
    """`head_tokens`: positions of a sequence whose logits are computed (default: all of them;
    GRPO computes only the answer's)."""
    b = DTYPE_BYTES[dtype]
    notes: list[str] = []
    trainable = counts.trainable_params
    frozen = counts.total_params - trainable
    if adapter.type == "full":
        weights = counts.total_params * b
        param_bytes = b
        notes.append(f"full: weights, gradients and both AdamW states in {dtype}")
    elif adapter.type == "qlora":
        quantized = shape.linear_params
        other = max(frozen - quantized, 0)
        weights = (
            int(quantized_bytes(quantized, adapter.double_quant)) + other * b + trainable * ADAPTER_BYTES
        )
        param_bytes = ADAPTER_BYTES
        notes.append(
            f"qlora: {quantized:,} linear weights in 4-bit {adapter.quant_type}"
            f"{' with double quantization' if adapter.double_quant else ''}; "
            f"embeddings, norms and output head ({other:,}) in {dtype}; adapters fp32"
        )
    else:
        weights = frozen * b + trainable * ADAPTER_BYTES
        param_bytes = ADAPTER_BYTES
        notes.append(f"{adapter.type}: frozen base in {dtype}; trainable parameters and their states fp32")
    gradients = trainable * param_bytes
    optimizer = ADAM_STATES * trainable * param_bytes
    tokens = seq_len + (adapter.num_virtual_tokens if adapter.type == "prompt_tuning" else 0)
    per_layer, head, checkpoint = activation_elements_per_token(
        shape, adapter, counts, seq_len=tokens, dtype_bytes=b, is_gpu=is_gpu
    )
    if gradient_checkpointing:
        body = shape.num_layers * checkpoint + per_layer
        notes.append("gradient checkpointing: one input per layer kept, one layer recomputed at a time")
    else:
        body = shape.num_layers * per_layer
    logits = tokens if head_tokens is None else min(head_tokens, tokens)
    activations = (body * tokens + head * logits) * micro_batch * b
    workspace = 0
    if adapter.type == "qlora":
        workspace = shape.largest_linear * b  # one dequantized weight at a time
    elif adapter.type == "dora":
        largest = max((lin.numel for lin in counts.adapted), default=0)
        workspace = 2 * largest * b  # B@A and W + B@A for the column norms
    if workspace:
        notes.append(f"activations include {workspace:,} bytes of per-layer workspace")
    notes.append(
        f"activations for micro-batch {micro_batch} x {tokens} tokens"
        f"{'' if logits == tokens else f' (logits of the last {logits})'}, SDPA attention (no s^2 term)"
    )
    return MemoryBreakdown(
        weights=int(weights),
        gradients=int(gradients),
        optimizer=int(optimizer),
        activations=int(activations + workspace),
        notes=notes,
    )


def per_device(
    memory: MemoryBreakdown, shape: ModelShape, *, devices: int, strategy: str, dtype: str
) -> MemoryBreakdown:
    """One device's share of a run on `devices` devices. DDP keeps a whole replica (weights,
    gradients, optimizer state) on each; FSDP (full shard) keeps 1/devices of each, plus the
    unsharded weights of the layer being computed and of the one prefetched after it."""
    if devices <= 1 or strategy != "fsdp":
        if devices > 1:
            memory.notes.append(f"ddp: a whole replica on each of {devices} devices")
        return memory
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2)
    layer = max(shape.total_params - embeddings, 0) // max(shape.num_layers, 1)
    gathered = 2 * layer * DTYPE_BYTES[dtype]
    return MemoryBreakdown(
        weights=-(-memory.weights // devices) + gathered,
        gradients=-(-memory.gradients // devices),
        optimizer=-(-memory.optimizer // devices),
        activations=memory.activations,
        notes=[
            *memory.notes,
            f"fsdp: weights, gradients and optimizer state sharded over {devices} devices; "
            f"weights include {gathered:,} bytes for two gathered decoder layers (embeddings and "
            "head counted sharded)",
        ],
    )
