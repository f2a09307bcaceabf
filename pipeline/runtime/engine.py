"""Everything DeepSpeed-shaped: the config dict, the engine wrapper, checkpoint consolidation.

This is the only module that imports deepspeed (lazily, so `--check` and tests of `ds_config`
stay light). The training loops (pretraining and fine-tuning) see only `Engine`:

    engine = Engine(lambda: build_model(cfg), ds_config(batch=..., optim=..., parallel=...,
                                                      total_steps=..., world_size=...))
    for micro in micro_batches:                 # grad_accum of them
        engine.forward_backward(micro, normalizer=targets_in_this_step_on_all_ranks)
    engine.step()

Batches follow transformers' conventions: `labels` has the shape of `input_ids`, -100 is ignored
and the engine shifts it (position t predicts labels[t+1]). A batch may instead carry
`shift_labels`, already aligned with the positions (what the packed pretraining loader yields,
so no position is wasted). The LR is set before every optimizer step from the 'lr_schedule'
entry of the config (see schedule.py); DeepSpeed's own scheduler is not used.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import dist
from pipeline.errors import CheckpointError
from pipeline.runtime.config import BatchConfig, OptimConfig, ParallelConfig
from pipeline.runtime.schedule import make_lr_fn

IGNORE_INDEX = -100
NO_DECAY_HINTS = ("norm", "bias")  # RMSNorm weights and biases get no weight decay


def ds_config(
    *,
    batch: BatchConfig,
    optim: OptimConfig,
    parallel: ParallelConfig,
    total_steps: int,
    world_size: int,
    load_universal: bool = False,
) -> dict:
    """The DeepSpeed config dict for these sections (pure: no processes, no device queries).

    `load_universal` makes the engine read a universal checkpoint (resume at another
    data-parallel size). Unsupported combinations were refused by ParallelConfig.validate.
    """
    dp = parallel.dp_size(world_size)
    cfg: dict = {
        # DeepSpeed counts every rank of an AutoTP group as if it had its own samples (they share one).
        "train_batch_size": batch.global_size * parallel.tp_size,
        "train_micro_batch_size_per_gpu": batch.micro_size,
        "gradient_accumulation_steps": batch.grad_accum(dp),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": _zero_block(parallel),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # torch's AdamW: no 43 s JIT build of DeepSpeed's CPU Adam; Engine turns it off on GPUs.
                # ZeRO-Offload needs DeepSpeed's CPU Adam (it steps on the host).
                "torch_adam": not parallel.offload_optimizer,
            },
        },
        "steps_per_print": 2**31 - 1,  # our metrics.jsonl is the log; DeepSpeed's prints are noise
        "wall_clock_breakdown": False,
        # Ours, not DeepSpeed's: Engine pops it and sets the LR per step (schedule.lr_at).
        "lr_schedule": {
            "lr": optim.lr,
            "min_lr": optim.min_lr,
            "warmup_steps": optim.warmup_steps,
            "total_steps": optim.schedule_steps or total_steps,
            "schedule": optim.schedule,
            "decay_fraction": optim.decay_fraction,
        },
    }
    cfg.update(_precision_block(parallel))
    if parallel.tp_size > 1:
        cfg["tensor_parallel"] = {"autotp_size": parallel.tp_size}
    if parallel.activation_checkpointing:
        cfg["activation_checkpointing"] = {"partition_activations": False}
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def _zero_block(parallel: ParallelConfig) -> dict:
    block: dict = {"stage": parallel.zero_stage}
    if parallel.offload_optimizer:
        block["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if parallel.offload_params:
        block["offload_param"] = {"device": "cpu", "pin_memory": True}
    return block


def _precision_block(parallel: ParallelConfig) -> dict:
    """bf16 / fp16 (dynamic loss scaling: loss_scale 0) / nothing for fp32."""
    if parallel.precision == "bf16":
        # Skip (and report) a step whose gradient norm is inf/NaN, under every ZeRO stage.
        return {"bf16": {"enabled": True, "check_grad_overflow": True}}
    if parallel.precision == "fp16":
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "initial_scale_power": parallel.fp16_initial_scale_power,
                "loss_scale_window": parallel.fp16_loss_scale_window,
                "hysteresis": parallel.fp16_hysteresis,
                "min_loss_scale": 1,
            }
        }
    return {}


def precision_supported(precision: str) -> bool:
    """Whether this machine's DeepSpeed accelerator trains in `precision` (fp16 fails on most CPUs,
    unless GRISTMILL_CPU_FP16=emulate asks for the emulated path, see _emulate_cpu_fp16)."""
    if precision == "fp32":
        return True
    _quiet()
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if precision == "bf16":
        return bool(acc.is_bf16_supported())
    return bool(acc.is_fp16_supported()) or (acc.device_name() == "cpu" and _cpu_fp16_emulation())


def _cpu_fp16_emulation() -> bool:
    return os.environ.get("GRISTMILL_CPU_FP16", "") == "emulate"


def _emulate_cpu_fp16(acc) -> None:
    """Let DeepSpeed's CPU accelerator run fp16 on a CPU without AVX512-FP16/AMX-FP16.

    torch emulates the half matmuls (2.5-3x slower than fp32), which is enough to exercise the
    fp16 path (dynamic loss scaling, overflow skips) in CPU tests. Never on by default.
    """
    cls = type(acc)
    cls.is_fp16_supported = lambda self: True
    cls.supported_dtypes = lambda self: [torch.float, torch.bfloat16, torch.float16]


def _quiet() -> None:
    """Silence DeepSpeed/transformers noise that says nothing actionable (notes, section 10)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.ERROR)
    except ImportError:
        pass
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def init_distributed() -> None:
    """Start the process group once; a plain `python` run becomes a 1-rank group on a free port."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    deepspeed.init_distributed(verbose=False)


_init_distributed = init_distributed  # the name fine-tuning first imported


def _share_cpu_threads() -> None:
    """On CPU, split the cores between the local ranks unless OMP_NUM_THREADS says otherwise
    (the deepspeed launcher leaves every rank with all cores, which oversubscribes them)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms and biases (judged by name: ZeRO-3 params are flat)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(h in name.lower() for h in NO_DECAY_HINTS) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class StepResult:
    """What one optimizer step did: skipped steps leave the weights untouched."""

    applied: bool
    grad_norm: float | None
    loss_scale: float


class Engine:
    """A DeepSpeed engine with exactly what a training loop needs; gradients are exact d(loss)/d(w)."""

    def __init__(self, model_fn: Callable[[], torch.nn.Module], ds_cfg: dict):
        _quiet()
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from transformers.integrations import HfDeepSpeedConfig

        init_distributed()
        ds_cfg = copy.deepcopy(ds_cfg)
        sched = ds_cfg.pop("lr_schedule", None)
        self.lr_schedule = sched
        self._lr_fn = make_lr_fn(sched) if sched else None
        acc = get_accelerator()
        if acc.device_name() == "cpu":
            _share_cpu_threads()
            if "fp16" in ds_cfg and not acc.is_fp16_supported() and _cpu_fp16_emulation():
                _emulate_cpu_fp16(acc)  # before zero.Init picks the dtype
        else:
            ds_cfg["optimizer"]["params"]["torch_adam"] = False  # DeepSpeed's fused Adam is faster on GPUs
        # transformers keeps only a weak reference: this object must outlive model construction,
        # or from_config/from_pretrained silently builds the full model on every rank. Under ZeRO-3
        # it makes from_config run inside deepspeed.zero.Init: weights are born partitioned.
        self._hf_ds_config = HfDeepSpeedConfig(ds_cfg)
        model = model_fn()
        # True when zero.Init partitioned the weights as they were created (no rank held the model).
        self.born_partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
        if "activation_checkpointing" in ds_cfg:
            model.activation_checkpointing_enable()
        self.activation_checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
        wd = ds_cfg["optimizer"]["params"]["weight_decay"]
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, wd), config=ds_cfg
        )
        self.device = torch.device(acc.current_device_name())
        self.tp_size = ds_cfg.get("tensor_parallel", {}).get("autotp_size", 1)
        self.world_size = dist.world_size()
        self.dp_size = self.world_size // self.tp_size
        self.dp_rank = dist.rank() // self.tp_size  # AutoTP groups consecutive ranks; they share a batch
        self.grad_accum = self.ds.gradient_accumulation_steps()
        self.zero_stage = int(ds_cfg["zero_optimization"]["stage"])

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken (restored by load())."""
        return int(self.ds.global_steps)

    def set_lr_schedule(self, spec: dict) -> None:
        """Use this schedule (a checkpoint's) from now on."""
        self.lr_schedule, self._lr_fn = dict(spec), make_lr_fn(spec)

    @property
    def loss_scale(self) -> float:
        """The current (dynamic, under fp16) loss scale; 1.0 for bf16/fp32."""
        return float(
            getattr(self.ds.optimizer, "cur_scale", None) or getattr(self.ds.optimizer, "loss_scale", 1.0)
        )

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of next-token cross-entropy over the batch's target tokens (fp32). The hook for other
        heads: a subclass overrides it (fine-tuning's classification engine does) and keeps step/eval."""
        inputs = {
            k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch
        }
        logits = self.ds(**inputs).logits  # (B, T, vocab)
        if "shift_labels" in batch:
            targets = batch["shift_labels"]
        else:
            logits, targets = logits[:, :-1], batch["labels"][:, 1:]
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            targets.to(self.device).reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def forward_backward(
        self, batch: dict[str, torch.Tensor], normalizer: float, poison: bool = False
    ) -> float:
        """Backward of (this micro batch's token-loss sum / normalizer); returns the unscaled sum.

        `normalizer` is the number of target tokens in the whole optimizer step on all ranks.
        `poison` multiplies the loss by NaN (fault injection for tests of the non-finite path).
        """
        loss_sum = self.loss_sum(batch)
        if poison:
            loss_sum = loss_sum * float("nan")
        # DeepSpeed divides by grad_accum in backward() and averages gradients over dp ranks;
        # multiplying back makes the accumulated gradient exactly d(sum of losses / normalizer).
        scale = self.grad_accum * self.dp_size / float(normalizer)
        self.ds.backward(loss_sum * scale)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # bookkeeping only: advances DeepSpeed's micro-step counter
        return float(loss_sum.detach())

    def step(self) -> StepResult:
        """Set this step's LR, clip, and apply the optimizer (after grad_accum forward_backward calls).

        ZeRO (every stage, every precision here) skips the update when the global gradient norm is
        inf/NaN, agreed over all ranks; under fp16 that is also how loss-scale overflows are skipped.
        """
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError(f"step() needs {self.grad_accum} forward_backward calls first")
        if self._lr_fn is not None:
            lr = self._lr_fn(self.global_steps)
            for group in self.ds.optimizer.param_groups:
                group["lr"] = lr
        scale = self.loss_scale  # the scale this step's gradients were computed with
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        return StepResult(applied=bool(self.ds.was_step_applied()), grad_norm=norm, loss_scale=scale)

    @torch.no_grad()
    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(token-loss sum, target tokens) of one batch, without gradients; call on every rank."""
        self.ds.eval()
        try:
            loss_sum = self.loss_sum(batch)
        finally:
            self.ds.train()
        targets = batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]
        return float(loss_sum), int((targets != IGNORE_INDEX).sum())

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits (B, T, vocab) on the CPU, in eval mode; collective under ZeRO-3 and TP."""
        self.ds.eval()
        try:
            return self.ds(input_ids=input_ids.to(self.device)).logits.float().cpu()
        finally:
            self.ds.train()

    def layout(self) -> dict[str, list[int]]:
        """Each parameter's shape on this rank: the AutoTP shard, or the full shape under ZeRO-3."""
        out = {}
        for name, p in self.module.named_parameters():
            shape = getattr(p, "ds_shape", None) or p.shape  # ZeRO-3 params are empty placeholders
            out[name] = [int(x) for x in shape]
        return out

    def save(self, root: Path, tag: str, client_state: dict) -> None:
        """DeepSpeed checkpoint into root/tag on every rank (no `latest`: checkpoint.py owns it)."""
        self.ds.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)

    def load(self, root: Path, tag: str) -> dict:
        """Restore weights, optimizer and step count from root/tag; returns this rank's client state."""
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        # DeepSpeed's universal-checkpoint load copies param group 0's hyperparameters onto every
        # group, which would give norms and biases weight decay; the groups' own values are restored.
        decays = [g.get("weight_decay") for g in self.ds.optimizer.param_groups]
        try:
            path, client_state = self.ds.load_checkpoint(str(root), tag=tag)
        except ZeRORuntimeException as exc:
            raise CheckpointError(f"{root}/{tag}: cannot resume with this world size: {exc}") from None
        if path is None:
            raise CheckpointError(f"{root}/{tag}: DeepSpeed found no checkpoint to load")
        for group, wd in zip(self.ds.optimizer.param_groups, decays):
            group["weight_decay"] = wd
        _unshare_adam_steps(self.ds.optimizer)
        return client_state or {}


def _unshare_adam_steps(zero_optimizer) -> None:
    """Give every parameter group its own Adam step tensor.

    DeepSpeed's ZeRO-3 universal load assigns one step tensor to all groups; torch's AdamW
    increments it in place once per group, so the bias correction would run ahead by a step per
    group and per update.
    """
    inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
    for st in getattr(inner, "state", {}).values():
        if isinstance(st, dict) and torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()


def device_name() -> str:
    """The accelerator's marketing name ('NVIDIA H100 80GB HBM3'), or 'cpu'."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return "cpu"
    return str(torch.cuda.get_device_name()) if torch.cuda.is_available() else acc.device_name()


def peak_memory_mib() -> float:
    """Peak memory of this rank: accelerator allocations on GPUs, the process's peak RSS on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def to_universal(src: Path, dst: Path) -> None:
    """Convert a DeepSpeed checkpoint folder to the universal format (any data-parallel size).

    Runs DeepSpeed's converter in a child process (it forks worker pools and holds every
    fragment); ZeRO-1/2 checkpoints lack its bookkeeping state, which it injects.
    """
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(src),
        "--output_folder",
        str(dst),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"{src}: conversion to a universal checkpoint failed:\n{proc.stderr[-2000:]}")


def lazy_state_dict(root: Path, tag: str) -> dict:
    """name -> lazy tensor (`.contiguous()` materialises one fp32 tensor) of a ZeRO-2/3 checkpoint.

    The optimizer files are memory-mapped, so a caller that converts and writes one tensor at a
    time holds about one tensor in RAM, not the model.
    """
    _quiet()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (Path(root) / tag).is_dir():
        raise CheckpointError(f"{root}/{tag}: checkpoint folder not found")
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (HF names) of a ZeRO checkpoint, in this process, without a process group."""
    _quiet()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (Path(root) / tag).is_dir():
        raise CheckpointError(f"{root}/{tag}: checkpoint folder not found")
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
