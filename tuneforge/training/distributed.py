"""Multi-device runs: one training process per device under torch.distributed's own launcher
(`python -m torch.distributed.run`, torchrun), which starts the ranks, gives each its RANK,
WORLD_SIZE and rendezvous, and ends them all when one fails. The process group is the one
transformers' Trainer (accelerate) initialises from those variables: gloo on CPU, nccl on CUDA.

Every rank runs the same recipe. Data parallel: DDP (a replica per device) for adapter methods,
FSDP (FSDP2 `fully_shard`) for full fine-tuning: through accelerate's plugin on CUDA; on CPU,
where accelerate has no FSDP, the supervised recipe's Trainer shards the model itself and writes
full checkpoints (`trainer_class`); other CPU `fsdp` runs are DDP and say so. The job's
`batch_size` is the global batch: each rank takes `batch_size / world_size` examples per
micro-batch, so a run on N devices takes the same optimizer steps as a run on one.

Only rank 0 talks to the worker (start, metrics, checkpoints, the result); the Trainer saves
checkpoints and outputs from rank 0 (FSDP gathers the shards on all ranks first). A stop (cancel, pause) is
asked of rank 0 and agreed by all ranks after each step with one all-reduce, so every rank stops
after the same step. Importing this module does not import torch.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.training.interface import RunInfo, RunObserver, StepMetrics, StopReason

if TYPE_CHECKING:
    from transformers import Trainer

    from tuneforge.models.spec import JobSpec

STOP_CODES: dict[StopReason | None, int] = {None: 0, "pause": 1, "cancel": 2}
#: What `configure` decided for this rank's run (the start event reports it).
_run: dict[str, Any] = {}
#: Seconds between torchrun's checks of its ranks: a rank that dies ends the others this soon.
MONITOR_INTERVAL_S = 0.2
#: Where a single-host run's rendezvous, store and gloo sockets live.
LOOPBACK = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def per_device_batch(batch_size: int) -> int:
    """Each rank's micro-batch for a global `batch_size` (rounded up when it does not divide)."""
    return -(-batch_size // world_size())


def launch_command(nproc: int, module: str, *args: str) -> list[str]:
    """torchrun's command line for `nproc` ranks of `python -m module args` on this host; no
    restarts: the worker decides what a lost rank means for the job.

    The rendezvous, its store and the ranks' MASTER_ADDR are pinned to loopback. torchrun's
    `--standalone` puts only the rendezvous on localhost: the store the ranks join is served on
    the address named by `--local-addr`, by default `socket.getfqdn()` (torch.distributed.elastic:
    rendezvous/api.py and dynamic_rendezvous.py), and on a host whose name does not resolve, or
    resolves to an address that does not answer, torchrun retries that name for ever before
    starting any rank. A multi-node run would name the host's reachable address instead
    (docs/scaling.md)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={LOOPBACK}:0",  # port 0: the rendezvous store picks a free one
        f"--rdzv-id={uuid.uuid4().hex}",
        f"--local-addr={LOOPBACK}",
        "--max-restarts=0",
        f"--monitor-interval={MONITOR_INTERVAL_S}",
        "-m",
        module,
        *args,
    ]


def launch_env() -> dict[str, str]:
    """Environment for torchrun on one host: gloo's sockets on the loopback interface (unless
    the operator chose one), since gloo otherwise binds to whatever the host name resolves to."""
    return {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME") or LOOPBACK_INTERFACE}


def strategy_for(spec: JobSpec) -> str:
    """ddp or fsdp as the job asks (auto: fsdp for full fine-tuning)."""
    if spec.hardware is None:
        return "ddp"
    return spec.hardware.resolved_strategy(spec.adapter.type)


#: accelerate's FSDP plugin, through its environment, for `fsdp` runs on CUDA: FSDP2 (`fully_shard`).
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
}
#: What a QLoRA run changes: PEFT's documented FSDP + QLoRA recipe is FSDP1 with flat parameters
#: (`use_orig_params` false) and rank 0's states synced; transformers' Trainer fits its plugin to a
#: QLoRA model (mixed precision in the 4-bit storage dtype, LoRA layers wrapped on their own) on
#: the FSDP1 path only, and FSDP2 with 4-bit weights has open reports of wrong results
#: (docs/scaling.md). The weights are loaded by every rank onto its own device (loading.py).
QLORA_FSDP_ENV = {
    "FSDP_VERSION": "1",
    "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
    "FSDP_RESHARD_AFTER_FORWARD": "FULL_SHARD",
    "FSDP_USE_ORIG_PARAMS": "false",
    "FSDP_SYNC_MODULE_STATES": "true",
}


def configure(spec: JobSpec) -> dict[str, Any]:
    """Run in each rank before the recipe: for FSDP on CUDA, accelerate's FSDP plugin through
    its environment (TrainingArguments' Accelerator reads it): FSDP2, or FSDP1 for QLoRA
    (`QLORA_FSDP_ENV`). What the run will be, for the start event: world_size and the strategy
    actually used."""
    size = world_size()
    asked = strategy_for(spec)
    if size <= 1:
        return {}
    used = asked
    if asked == "fsdp":
        import torch

        if torch.cuda.is_available():
            os.environ.update(FSDP_ENV | (QLORA_FSDP_ENV if spec.adapter.type == "qlora" else {}))
        elif spec.adapter.type != "full" or spec.method.type != "supervised":
            used = "ddp"  # CPU: only the supervised recipe shards, full fine-tuning only (trainer_class)
    _run.update(world_size=size, strategy=used, strategy_asked=asked)
    return dict(_run)


def _cpu_fsdp() -> bool:
    """Whether this rank's run shards its model itself: `fsdp` on CPU ranks, where accelerate
    offers no FSDP (configure leaves accelerate's plugin to CUDA runs)."""
    return _run.get("strategy") == "fsdp" and "ACCELERATE_USE_FSDP" not in os.environ


def trainer_class(base: type[Trainer]) -> type[Trainer]:
    """`base`, or on the CPU ranks of a `fsdp` run a subclass that shards the model with FSDP2
    and writes and reads checkpoints in the single-device layout (`_CpuFsdpTrainer`)."""
    if not _cpu_fsdp():
        return base
    return type(f"CpuFsdp{base.__name__}", (_CpuFsdpTrainer, base), {})


def shard(model: Any) -> dict[str, Any]:
    """FSDP2 on this process group: `fully_shard` on each decoder layer (the model's
    `_no_split_modules`) and on the root, every rank keeping its part of each parameter. Returns
    each rank's count of local parameter elements, for the start event."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(module)
    fully_shard(model)
    local = sum(_local(p).numel() for p in model.parameters())
    counts: list[Any] = [None] * world_size()
    dist.all_gather_object(counts, local)
    _run.update(local_params_per_rank=counts)
    return dict(_run)


def _local(tensor: Any) -> Any:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def full_state_dict(model: Any) -> dict[str, Any] | None:
    """A sharded model's weights gathered from all ranks (a collective: every rank calls it), on
    CPU: the whole state dict on rank 0, an empty one on the others. None for an unsharded model
    (save it as usual)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module: Any = model  # an nn.Module too: fully_shard swaps the module's class
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class _CpuFsdpTrainer:
    """Mixed into the recipe's Trainer class on CPU `fsdp` ranks (see `trainer_class`).

    The model is sharded when training starts, after a resumed run's checkpoint weights were
    loaded into the whole model as usual. The Trainer then treats it as a model that owns its
    placement and gradient reduction (its `is_distributed_loading_by_transformers` path: no DDP
    wrapper, FSDP2's reduce-scatter deferred to the end of each accumulation window). Checkpoints
    hold the full model (`model.safetensors`, as a single-device run writes it) and the full
    optimizer state (keyed by parameter name), gathered on all ranks and written by rank 0; a
    resumed run shards both again, so it may run on another world size."""

    model: Any
    optimizer: Any
    lr_scheduler: Any
    args: Any
    is_distributed_loading_by_transformers: bool

    def _prepare_for_training(
        self, max_steps: Any, train_dataloader: Any, resume_from_checkpoint: Any
    ) -> Any:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.model, FSDPModule):
            shard(self.model)
        self.is_distributed_loading_by_transformers = True
        return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)  # type: ignore[misc]

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        gathered = full_state_dict(self.model)
        if self.args.should_save:
            super()._save(output_dir, state_dict=gathered if gathered is not None else state_dict)  # type: ignore[misc]

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, _torch_optimizer(self.optimizer), options=options)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, _OPTIMIZER_FILE))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, _SCHEDULER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, _OPTIMIZER_FILE)):
            return
        state = torch.load(os.path.join(checkpoint, _OPTIMIZER_FILE), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            self.model,
            _torch_optimizer(self.optimizer),
            optim_state_dict=state,
            options=StateDictOptions(full_state_dict=True),
        )
        scheduler = torch.load(
            os.path.join(checkpoint, _SCHEDULER_FILE), map_location="cpu", weights_only=True
        )
        self.lr_scheduler.load_state_dict(scheduler)


#: The Trainer's names for a checkpoint's optimizer and scheduler states.
_OPTIMIZER_FILE = "optimizer.pt"
_SCHEDULER_FILE = "scheduler.pt"


def _torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def summary() -> dict[str, Any]:
    """For the start event: world_size and strategy of a multi-device run; empty otherwise."""
    return dict(_run)


class RankObserver:
    """The observer every rank hands the recipe: rank 0 forwards to the worker's observer, the
    others report nothing; `stop_requested` is agreed by all ranks (called once per step by the
    Trainer callback on every rank, so the all-reduce lines up)."""

    def __init__(self, inner: RunObserver | None, run: dict[str, Any]) -> None:
        self.inner = inner if rank() == 0 else None
        self.run = run
        self._agreed: StopReason | None = None

    def on_start(self, info: RunInfo) -> None:
        if self.inner is not None:
            self.inner.on_start(info)

    def on_metrics(self, metrics: StepMetrics) -> None:
        if self.inner is not None:
            self.inner.on_metrics(metrics)

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.on_checkpoint(step, path, metrics)

    def on_notice(self, message: str, data: dict[str, Any]) -> None:
        notice = getattr(self.inner, "on_notice", None)
        if notice is not None:
            notice(message, data)

    def stop_requested(self) -> StopReason | None:
        if self._agreed is not None:
            return self._agreed
        local = self.inner.stop_requested() if self.inner is not None else None
        code = STOP_CODES[local]
        if world_size() > 1:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([code], dtype=torch.int64)
                if dist.get_backend() == "nccl":
                    flag = flag.cuda()
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                code = int(flag.item())
        self._agreed = next((reason for reason, value in STOP_CODES.items() if value == code), None)
        return self._agreed
