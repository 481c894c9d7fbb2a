"""Loading a base model and describing its adapter: device, dtype, attention kernel, quantization
and the PEFT config. Local directories only: nothing is downloaded."""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.models.spec import AdapterSpec, MethodType

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase, Trainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Gradient checkpointing pays off only for models whose activations are large; tiny ones run slower.
CHECKPOINTING_MIN_PARAMS = 300_000_000

# transformers 5's from_pretrained swaps `PreTrainedModel.tie_weights` for a no-op while it loads
# (initialization.no_tie_weights), on the class, for the whole process. Two loads in two threads
# (the inference engine's runners) could restore each other's no-op and leave every later model
# of the process with untied embeddings, so loads take turns.
_FROM_PRETRAINED = threading.Lock()


@dataclass(frozen=True)
class Device:
    """Where a run trains and with which numerics."""

    cuda: bool
    dtype_name: str  # "bfloat16" on CUDA, "float32" on CPU
    attn_implementation: str  # "flash_attention_2" when installed on CUDA, else "sdpa"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype_name)
        return dtype

    @property
    def flash_attention(self) -> bool:
        return self.attn_implementation == "flash_attention_2"


def quiet_progress_bars() -> None:
    """Runs log to the worker, not to a terminal: no per-map and per-shard progress bars."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def detect_device() -> Device:
    import torch

    quiet_progress_bars()
    if torch.cuda.is_available():
        flash = importlib.util.find_spec("flash_attn") is not None
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return Device(True, dtype, "flash_attention_2" if flash else "sdpa")
    return Device(False, "float32", "sdpa")


def choose_packing(requested: bool | None, method: MethodType, device: Device) -> bool:
    """Supervised: padding-free packing where flash attention's variable-length kernels make it pay
    (CUDA); on CPU/SDPA a packed row attends over its whole length, so length-grouped padded batches
    are faster (shared/reference/library-notes.md). Pretraining always packs; DPO never does (TRL 1.16
    has no padding-free DPO). An explicit true/false is honoured for supervised runs."""
    if method == "pretraining":
        return True
    if method == "dpo":
        return False
    if requested is not None:
        return requested
    return device.flash_attention


def quantization_config(adapter: AdapterSpec, device: Device) -> BitsAndBytesConfig | None:
    """bitsandbytes' 4-bit config for QLoRA; None for other adapters. When accelerate's FSDP shards
    the run (`qlora_sharded`), the packed 4-bit weights are stored in the device's dtype
    (`bnb_4bit_quant_storage`, uint8 by default): FSDP shards only floating tensors, and FSDP1
    flattens each wrapped block's parameters into one tensor of one dtype (docs/scaling.md)."""
    if adapter.type != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    storage: dict[str, Any] = (
        {"bnb_4bit_quant_storage": device.dtype} if qlora_sharded(adapter, device) else {}
    )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type,
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=device.dtype,
        **storage,
    )


def qlora_sharded(adapter: AdapterSpec | None, device: Device) -> bool:
    """A QLoRA run on CUDA ranks that accelerate's FSDP plugin shards (`distributed.configure`
    sets ACCELERATE_USE_FSDP for an `fsdp` run on CUDA; on CPU a QLoRA `fsdp` run is DDP)."""
    return (
        adapter is not None
        and adapter.type == "qlora"
        and device.cuda
        and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    )


def local_device_index() -> int:
    """This rank's CUDA device: torchrun's LOCAL_RANK (0 for a single-device run). accelerate
    trains each rank on `cuda:LOCAL_RANK` and refuses a 4-bit model loaded on another device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def load_kwargs(
    device: Device, adapter: AdapterSpec | None = None, *, trust_remote_code: bool = False
) -> dict[str, Any]:
    """`from_pretrained`'s arguments for this rank. A 4-bit model cannot be moved after loading
    (the Trainer leaves bitsandbytes models where they are), so QLoRA on CUDA loads onto this
    rank's own device, under DDP and FSDP alike; the model's dtype is the device's, which is also
    the 4-bit storage dtype of a sharded QLoRA run."""
    kwargs: dict[str, Any] = {
        "dtype": device.dtype,
        "attn_implementation": device.attn_implementation,
        "trust_remote_code": trust_remote_code,
    }
    quant = quantization_config(adapter, device) if adapter is not None else None
    if quant is not None:
        kwargs["quantization_config"] = quant
        if device.cuda:
            kwargs["device_map"] = {"": local_device_index()}
    return kwargs


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def assistant_only_loss_available(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the template has `{% generation %}` markers, or TRL knows a training variant of it."""
    from trl.chat_template_utils import get_training_chat_template

    from tuneforge.training.data import has_generation_markers

    if has_generation_markers(tokenizer):
        return True
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return False
    return True


def load_model(
    model_dir: Path,
    device: Device,
    adapter: AdapterSpec | None = None,
    *,
    trust_remote_code: bool = False,
    score_head_pad_token_id: int | None = None,
) -> PreTrainedModel:
    """The base model, in the device's dtype; 4-bit (bitsandbytes) for QLoRA and prepared for
    k-bit training, except on FSDP ranks: `prepare_model_for_kbit_training` upcasts every
    non-4-bit parameter to float32, which FSDP1 cannot flatten with the bf16-stored 4-bit weights
    (earlier TRL SFTTrainers skipped it for sharded QLoRA too; the Trainer's gradient
    checkpointing still applies). `adapter=None` loads the plain full-precision base (merges,
    references). With `score_head_pad_token_id`, the base as a one-label sequence classifier whose
    new score head reads the last token before that padding (reward models)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = load_kwargs(device, adapter, trust_remote_code=trust_remote_code)
    auto: Any = AutoModelForCausalLM
    if score_head_pad_token_id is not None:
        auto = AutoModelForSequenceClassification
        kwargs |= {"num_labels": 1, "pad_token_id": score_head_pad_token_id}
    with _FROM_PRETRAINED:
        model = auto.from_pretrained(model_dir, **kwargs)
    if "quantization_config" in kwargs and not qlora_sharded(adapter, device):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=use_gradient_checkpointing(model, device)
        )
    return model


def use_gradient_checkpointing(model: PreTrainedModel, device: Device) -> bool:
    return device.cuda and model.num_parameters() >= CHECKPOINTING_MIN_PARAMS


def peft_config(adapter: AdapterSpec, model: PreTrainedModel) -> PeftConfig | None:
    """The PEFT config for an adapter type; None for `full`."""
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )

    target: Any = adapter.target_modules
    if adapter.type in ("lora", "dora", "qlora"):
        alpha: Any = int(adapter.alpha) if float(adapter.alpha).is_integer() else adapter.alpha
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=adapter.r,
            lora_alpha=alpha,
            lora_dropout=adapter.dropout,
            target_modules=target,
            use_dora=adapter.type == "dora",
        )
    if adapter.type == "ia3":
        if target == "all-linear":
            # IA3 scales keys, values and the MLP's down projection; feed-forward = the down projection.
            names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            target = [n for n in ("k_proj", "v_proj", "down_proj") if n in names] or "all-linear"
            feedforward = ["down_proj"] if "down_proj" in names else None
        else:
            feedforward = [m for m in target if "down" in m or "mlp" in m or "fc" in m] or None
        return IA3Config(
            task_type=TaskType.CAUSAL_LM,
            target_modules=target,
            feedforward_modules=feedforward,
        )
    if adapter.type == "prefix_tuning":
        return PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=adapter.num_virtual_tokens,
        )
    if adapter.type == "prompt_tuning":
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=adapter.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
    if adapter.type == "full":
        return None
    raise ValueError(f"adapter.type {adapter.type!r} is not supported")


def trainable_model(
    model: PreTrainedModel, adapter: AdapterSpec, source_adapter: Path | None
) -> tuple[Any, PeftConfig | None]:
    """The model and PEFT config a recipe hands its trainer. A continued job trains its parent's
    adapter: loaded with PEFT as the trainable adapter (`is_trainable=True`), so there is no new
    config; otherwise the base and a fresh adapter's config (None for `full`)."""
    if source_adapter is None:
        return model, peft_config(adapter, model)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, source_adapter, is_trainable=True), None


def take_over_optimizer_state(trainer: Trainer, state_dir: Path | None, *, resuming: bool) -> None:
    """A continued job asked for its parent checkpoint's optimizer and scheduler state: loaded into
    the freshly made optimizer and scheduler as training begins (the run's own steps still count
    from 0). A run resumed from its own checkpoint has its own state, which wins."""
    if state_dir is None or resuming:
        return
    checkpoint: Path = state_dir
    import torch
    from transformers import TrainerCallback

    class TakeOverOptimizerState(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            try:
                optimizer = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
                scheduler = torch.load(checkpoint / "scheduler.pt", map_location="cpu", weights_only=True)
                kwargs["optimizer"].load_state_dict(optimizer)
                kwargs["lr_scheduler"].load_state_dict(scheduler)
            except (OSError, ValueError, KeyError) as error:
                raise ValueError(
                    f"the checkpoint's optimizer state does not fit this run's trainable parameters: {error}"
                ) from error

    trainer.add_callback(TakeOverOptimizerState())


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) exactly as PEFT's print_trainable_parameters counts them (4-bit weights
    counted as their unpacked sizes); for a plain model, the same rule over all parameters."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
