"""Everything DeepSpeed-shaped: the config dict, the engine wrapper, checkpoint consolidation.

This is the only module that imports deepspeed (lazily, so `--check` and tests of `ds_config`
stay light). The training loop (pipeline/runtime/loop.py) sees only `Engine`:

    engine = Engine(lambda: build_model(cfg), ds_config(batch=..., optim=..., parallel=...,
                                                      total_steps=..., world_size=...))
    for micro in micro_batches:                 # grad_accum of them
        loss = task.loss_sum(engine, micro)     # engine.forward(micro) inside; a device tensor
        engine.backward(loss, normalizer=targets_in_this_step_on_all_ranks)
    engine.step()

Batches follow transformers' conventions: `labels` has the shape of `input_ids`, -100 is ignored
and the loss shifts it (position t predicts labels[t+1]). A batch may instead carry
`shift_labels`, already aligned with the positions (what the packed pretraining loader yields,
so no position is wasted). The LR is set before every optimizer step from the 'lr_schedule'
entry of the config (see schedule.py); DeepSpeed's own scheduler is not used.

An update can be skipped before it happens (`backward(..., skip=True)` on the step's last micro
batch: non-finite loss, loss spike): ZeRO 1-3 and half precision check the gradients for inf/NaN
and skip the step when they find one, so a skipped step poisons its last backward with NaN;
ZeRO-0 in fp32 has no such check (DeepSpeed hands the gradients straight to torch's AdamW), so
there the engine checks the gradients itself and keeps the optimizer from stepping.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import dist
from pipeline.errors import CheckpointError, ConfigError
from pipeline.runtime.config import BatchConfig, OptimConfig, ParallelConfig
from pipeline.runtime.schedule import make_lr_fn

IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # batch keys the model takes
NO_DECAY_HINTS = ("norm", "bias")  # RMSNorm weights and biases get no weight decay


def ds_config(
    *,
    batch: BatchConfig,
    optim: OptimConfig,
    parallel: ParallelConfig,
    total_steps: int,
    world_size: int,
    load_universal: bool = False,
    device: str | None = None,
) -> dict:
    """The DeepSpeed config dict for these sections (pure: no processes).

    `device` ("cuda" or "cpu") picks the optimizer kernel; None asks DeepSpeed which accelerator this
    process uses. `load_universal` makes the engine read a universal checkpoint (resume at another
    data-parallel size). Unsupported combinations were refused by ParallelConfig.validate.
    """
    dp = parallel.dp_size(world_size)
    device = device or accelerator_kind()
    cfg: dict = {
        # DeepSpeed counts every rank of an AutoTP group as if it had its own samples (they share one).
        "train_batch_size": batch.global_size * parallel.tp_size,
        "train_micro_batch_size_per_gpu": batch.micro_size,
        "gradient_accumulation_steps": batch.grad_accum(dp),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": _zero_block(parallel),
        "optimizer": _optimizer_block(optim, parallel, device),
        # dtype of the gradient reduce(-scatter) across data-parallel ranks
        "communication_data_type": "fp32" if parallel.reduce_fp32 else parallel.precision,
        "steps_per_print": 2**31 - 1,  # our metrics.jsonl is the log; DeepSpeed's prints are noise
        "wall_clock_breakdown": False,
        # Ours, not DeepSpeed's: Engine pops it and sets the LR per step (schedule.lr_at).
        "lr_schedule": {
            "lr": optim.lr,
            "min_lr": optim.min_lr,
            "warmup_steps": optim.warmup_for(optim.schedule_steps or total_steps),
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


def _optimizer_block(optim: OptimConfig, parallel: ParallelConfig, device: str) -> dict:
    """AdamW: torch's by default (fused CUDA kernel on GPUs, foreach on CPUs: nothing to compile), or
    DeepSpeed's (`optim.adam: deepspeed`: FusedAdam on GPUs, CPU Adam on CPUs, built just in time with
    nvcc or a C++ compiler). ZeRO-Offload always uses DeepSpeed's CPU Adam: it steps on the host."""
    params: dict = {
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    deepspeed_adam = optim.adam == "deepspeed" or parallel.offload_optimizer
    params["torch_adam"] = not deepspeed_adam
    if not deepspeed_adam and device == "cuda":
        params["fused"] = True  # passed on to torch.optim.AdamW
    return {"type": "AdamW", "params": params}


def accelerator_kind() -> str:
    """The kind of DeepSpeed accelerator this process would use: "cuda" or "cpu"."""
    from deepspeed.accelerator import get_accelerator

    return "cpu" if get_accelerator().device_name() == "cpu" else "cuda"


def dp_coords(rank: int, world_size: int, tp_size: int = 1) -> tuple[int, int]:
    """(dp_rank, dp_size) of a global rank: AutoTP makes groups of consecutive ranks, which share a batch."""
    if tp_size < 1 or world_size % tp_size:
        raise ConfigError("parallel.tp_size", f"must divide the world size {world_size}, got {tp_size}")
    return rank // tp_size, world_size // tp_size


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
    """Whether this machine's DeepSpeed accelerator trains in `precision` (fp16 fails on most CPUs)."""
    if precision == "fp32":
        return True
    _quiet()
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return bool(acc.is_bf16_supported() if precision == "bf16" else acc.is_fp16_supported())


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


def init_distributed(timeout_min: float | None = None) -> None:
    """Start the process group once; a plain `python` run becomes a 1-rank group on a free port.

    Collectives time out after `timeout_min` minutes (parallel.collective_timeout_min; DeepSpeed's 10
    when None). Refuses DeepSpeed's CPU accelerator on a node that shows GPUs (check_accelerator); on
    CPU ranks, prepares DeepSpeed's shared-memory collective op or falls back to gloo's own.
    """
    import datetime

    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    _quiet()
    check_accelerator()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    if accelerator_kind() == "cpu":
        _cpu_collective_op()
    timeout = {} if timeout_min is None else {"timeout": datetime.timedelta(minutes=timeout_min)}
    deepspeed.init_distributed(verbose=False, **timeout)
    dist.init_side_group()  # the gloo group for CPU metadata when the main group is NCCL


def visible_gpus() -> tuple[int, str]:
    """(GPUs this node shows, where that was seen): CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`."""
    import shutil
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [x for x in visible.split(",") if x.strip() and x.strip() not in ("-1", "NoDevFiles")]
        return len(ids), f"CUDA_VISIBLE_DEVICES={visible}"
    if not shutil.which("nvidia-smi"):
        return 0, ""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0, ""
    return sum(line.startswith("GPU ") for line in out.splitlines()), "nvidia-smi -L"


def check_accelerator() -> None:
    """ConfigError when DeepSpeed would train on the CPU of a node with GPUs (a CPU build of torch, or
    a driver torch cannot use), unless DS_ACCELERATOR=cpu asks for the CPU."""
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or accelerator_kind() != "cpu":
        return
    gpus, seen = visible_gpus()
    if gpus:
        why = (
            "it is a CPU build" if not torch.version.cuda else "it cannot use them (driver or CUDA mismatch?)"
        )
        raise ConfigError(
            "DS_ACCELERATOR",
            f"this node shows {gpus} GPU(s) ({seen}) but torch {torch.__version__} would train on the CPU: "
            f"{why}. Install the CUDA build (bash launch/setup.sh --cuda), or set DS_ACCELERATOR=cpu to "
            "train on the CPU on purpose",
        )


STALE_BUILD_LOCK_S = 600  # a JIT build holds its lock for 30 s to a few minutes; older is a killed build's


def _cpu_collective_op() -> None:
    """Load DeepSpeed's shared-memory collective op for CPU ranks (compiling it the first time), or, when
    it cannot be built (no compiler, a failed or abandoned build), make DeepSpeed use gloo's own
    collectives, with one warning on rank 0 saying what that costs."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    if dist.world_size() == 1:  # no peer to talk to: neither build the op nor wait for its build
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
        return
    reason = _stale_build_lock(builder.name)
    if reason is None:
        try:
            builder.load(verbose=False)  # DeepSpeed's own call later finds it loaded
            return
        except Exception as exc:  # noqa: BLE001  any build failure (CalledProcessError, RuntimeError, OSError)
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    deepspeed.ops.__compatible_ops__[builder.NAME] = False  # DeepSpeed's build_shm_op then returns None
    if dist.rank() == 0:
        logging.getLogger(__name__).warning(
            "CPU collectives: DeepSpeed's shared-memory op could not be built (%s); using gloo's own "
            "all-reduce and all-gather instead (through the loopback network: slower between ranks on "
            "one machine, same results). Install a C++ compiler to get the op.",
            reason,
        )


def _stale_build_lock(name: str) -> str | None:
    """Why waiting for the op's build would hang: its lock file left by a killed build; None if free."""
    import time

    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (ImportError, OSError):
        return None
    if age < STALE_BUILD_LOCK_S:
        return None  # another rank or process is building it: wait for that build
    return f"{lock} is {age / 60:.0f} min old, left by a build that was killed; delete it to build again"


def _share_cpu_threads() -> None:
    """On CPU, split the cores between the local ranks unless OMP_NUM_THREADS says otherwise
    (the deepspeed launcher leaves every rank with all cores, which oversubscribes them)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None
) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms and biases (judged by name: ZeRO-3 params are flat).

    A parameter with a component of its dotted name in `lr_scales` (e.g. `score` for `score.weight`, also
    inside peft's `base_model.model.score.modules_to_save.default.weight`) trains at that multiple of the
    scheduled LR: its group's `lr_scale`, which Engine.step applies.
    """
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = not any(h in name.lower() for h in NO_DECAY_HINTS)
            groups.setdefault((decay, lr_scale_of(name, lr_scales or {})), []).append(p)
    return [  # body groups first: Engine.lr reports group 0
        {"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0, "lr_scale": key[1]}
        for key in sorted(groups, key=lambda k: (k[1] != 1.0, not k[0], k[1]))
    ]


def lr_scale_of(name: str, lr_scales: dict[str, float]) -> float:
    """The LR multiplier of a parameter: the first of its name's components found in `lr_scales`, else 1."""
    return next((lr_scales[part] for part in name.split(".") if part in lr_scales), 1.0)


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]):
    """Full values of ZeRO-3 partitioned parameters inside the block, on every rank (collective: every
    rank enters with the same parameters); rank 0's values are the ones kept. No-op for parameters
    ZeRO-3 does not partition."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


def build_device(ds_cfg: dict) -> contextlib.AbstractContextManager:
    """Where the model is built: under ZeRO 0-2 and AutoTP on this rank's accelerator device (a torch
    device context, which from_config and from_pretrained follow), so no rank holds the model in host
    memory; under ZeRO-3, where zero.Init places each partition itself, and on CPUs, nothing changes."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if int(ds_cfg["zero_optimization"]["stage"]) == 3 or acc.device_name() == "cpu":
        return contextlib.nullcontext()
    return torch.device(acc.current_device_name())


def built_summary(model: torch.nn.Module) -> dict:
    """How the model was built, before DeepSpeed wrapped it: {"dtypes": {dtype: parameters}, "device"}."""
    dtypes: dict[str, int] = {}
    devices = set()
    for p in model.parameters():
        name = str(p.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + int(getattr(p, "ds_numel", p.numel()))
        devices.add(p.device.type)
    return {"dtypes": dtypes, "devices": sorted(devices)}


@dataclass
class StepResult:
    """What one optimizer step did: skipped steps leave the weights untouched."""

    applied: bool
    grad_norm: float | None
    loss_scale: float


class Engine:
    """A DeepSpeed engine with exactly what a training loop needs; gradients are exact d(loss)/d(w)."""

    def __init__(
        self, model_fn: Callable[[], torch.nn.Module], ds_cfg: dict, lr_scales: dict[str, float] | None = None
    ):
        """`lr_scales`: LR multipliers by parameter-name component (see param_groups)."""
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
        else:
            dist.bind_device()  # before the model is built on "the rank's device"
        # transformers keeps only a weak reference: this object must outlive model construction,
        # or from_config/from_pretrained silently builds the full model on every rank. Under ZeRO-3
        # it makes from_config run inside deepspeed.zero.Init: weights are born partitioned.
        self._hf_ds_config = HfDeepSpeedConfig(ds_cfg)
        with build_device(ds_cfg):
            model = model_fn()
        # True when zero.Init partitioned the weights as they were created (no rank held the model).
        self.born_partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
        self.built = built_summary(model)
        if "activation_checkpointing" in ds_cfg:
            model.activation_checkpointing_enable()
        self.activation_checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
        # Frozen weights (PEFT) stay out of checkpoints: model_fn rebuilds them as they were.
        self.frozen_params = sum(not p.requires_grad for p in model.parameters())
        wd = ds_cfg["optimizer"]["params"]["weight_decay"]
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, wd, lr_scales), config=ds_cfg
        )
        self.device = torch.device(acc.current_device_name())
        self.tp_size = ds_cfg.get("tensor_parallel", {}).get("autotp_size", 1)
        self.world_size = dist.world_size()
        self.dp_rank, self.dp_size = dp_coords(dist.rank(), self.world_size, self.tp_size)
        self.grad_accum = self.ds.gradient_accumulation_steps()
        self.zero_stage = int(ds_cfg["zero_optimization"]["stage"])
        # DeepSpeed checks gradients for inf/NaN (and skips the step) under ZeRO >= 1 or bf16/fp16.
        self._checks_overflow = self.zero_stage > 0 or "bf16" in ds_cfg or "fp16" in ds_cfg
        self._skip = False

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

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on this rank's device."""
        return t.to(self.device, non_blocking=True)

    def forward(self, batch: dict[str, torch.Tensor]):
        """The model's output (transformers' ModelOutput) on the batch's model inputs, moved to the
        device; a collective under ZeRO-3 and TP (every rank calls it, the same number of times)."""
        inputs = {k: self.to_device(batch[k]) for k in MODEL_INPUTS if k in batch}
        return self.ds(**inputs)

    def backward(self, loss_sum: torch.Tensor, normalizer: float, *, skip: bool = False) -> None:
        """Backward of (loss_sum / normalizer); `normalizer` counts the targets of the whole
        optimizer step on all ranks, so the accumulated gradient is exactly d(mean loss)/d(w).

        `skip` (on the step's last micro batch, the same on every rank) makes the next step() leave
        the weights and the optimizer state untouched.
        """
        if skip and self._checks_overflow:
            loss_sum = loss_sum * float("nan")  # DeepSpeed finds the NaN gradients and skips the step
        self._skip = skip
        # DeepSpeed divides by grad_accum in backward() and averages gradients over dp ranks;
        # multiplying back makes the accumulated gradient exactly d(sum of losses / normalizer).
        scale = self.grad_accum * self.dp_size / float(normalizer)
        self.ds.backward(loss_sum * scale)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # bookkeeping only: advances DeepSpeed's micro-step counter

    def step(self) -> StepResult:
        """Set this step's LR, clip, and apply the optimizer (after grad_accum backward calls).

        ZeRO 1-3 and half precision skip the update when the global gradient norm is inf/NaN,
        agreed over all ranks (under fp16 that is also how loss-scale overflows are skipped);
        ZeRO-0 fp32 does the same here (`_unchecked_skip`, `_optimizer_frozen`).
        """
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError(f"step() needs {self.grad_accum} backward calls first")
        if self._lr_fn is not None:
            lr = self._lr_fn(self.global_steps)
            for group in self.ds.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        scale = self.loss_scale  # the scale this step's gradients were computed with
        skipped = False if self._checks_overflow else self._unchecked_skip()
        with self._optimizer_frozen(skipped):
            self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        applied = bool(self.ds.was_step_applied()) and not skipped
        return StepResult(applied=applied, grad_norm=norm, loss_scale=scale)

    def _unchecked_skip(self) -> bool:
        """ZeRO-0 fp32: whether to skip this step (asked to, or an inf/NaN gradient on any rank)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        finite = not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())  # one sync
        return bool(dist.max_floats([float(self._skip or not finite)])[0])

    @contextlib.contextmanager
    def _optimizer_frozen(self, frozen: bool):
        """While `frozen`, the optimizer's own step() does nothing: DeepSpeed still clips, zeroes the
        gradients and counts the step, but weights, moments and Adam's step count stay as they were."""
        if not frozen:
            yield
            return
        opt = self.ds.optimizer
        opt.step = lambda *args, **kwargs: None  # an instance attribute shadows the class's step()
        try:
            yield
        finally:
            del opt.step

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode without gradients for the block (validation, parity logits); train mode after."""
        self.ds.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            self.ds.train()

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits on the CPU ((B, T, vocab), or (B, classes) for a classifier), in eval mode;
        collective under ZeRO-3 and TP."""
        with self.evaluating():
            return self.forward({"input_ids": input_ids}).logits.float().cpu()

    def layout(self) -> dict[str, list[int]]:
        """Each parameter's shape on this rank: the AutoTP shard, or the full shape under ZeRO-3."""
        out = {}
        for name, p in self.module.named_parameters():
            shape = getattr(p, "ds_shape", None) or p.shape  # ZeRO-3 params are empty placeholders
            out[name] = [int(x) for x in shape]
        return out

    def save(self, root: Path, tag: str, client_state: dict) -> None:
        """DeepSpeed checkpoint into root/tag on every rank (no `latest`: checkpoint.py owns it); only
        the trained parameters (and the optimizer state) when some are frozen."""
        self.ds.save_checkpoint(
            str(root),
            tag=tag,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=self.frozen_params > 0,
        )

    def load(self, root: Path, tag: str) -> dict:
        """Restore weights, optimizer and step count from root/tag; returns this rank's client state."""
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        # Workaround 1 (DeepSpeed 0.19.8, ZeRO-3 universal load: stage3.py
        # load_hp_checkpoint_state_from_checkpoint_dir_stage3, "the hyperparameters of each parameter
        # should be the same"): param group 0's saved hyperparameters are copied onto every group, which
        # would give norms and biases weight decay (and every group group 0's LR multiplier), so the
        # groups' own values are put back. The load came
        # with https://github.com/deepspeedai/DeepSpeed/pull/5475; several param groups became
        # convertible only with https://github.com/deepspeedai/DeepSpeed/pull/7585 (issue #7584), and the
        # load still assumes one. tests/test_runtime_upstream.py fails once DeepSpeed keeps each group's.
        own = [
            {k: g[k] for k in ("weight_decay", "lr_scale") if k in g} for g in self.ds.optimizer.param_groups
        ]
        try:
            # without frozen parameters in the checkpoint, they keep the values model_fn gave them
            path, client_state = self.ds.load_checkpoint(
                str(root), tag=tag, load_module_strict=self.frozen_params == 0
            )
        except ZeRORuntimeException as exc:
            raise CheckpointError(f"{root}/{tag}: cannot resume with this world size: {exc}") from None
        if path is None:
            raise CheckpointError(f"{root}/{tag}: DeepSpeed found no checkpoint to load")
        for group, values in zip(self.ds.optimizer.param_groups, own):
            group.update(values)
        _unshare_adam_steps(self.ds.optimizer)
        return client_state or {}


def _unshare_adam_steps(zero_optimizer) -> None:
    """Give every parameter group its own Adam step tensor (workaround 2 of Engine.load).

    DeepSpeed's ZeRO-3 universal load (DeepSpeed 0.19.8, stage3.py, `state[fp32_param]['step'] =
    state_step` for every sub-group; the restored step came with
    https://github.com/deepspeedai/DeepSpeed/pull/5289) assigns one step tensor to all groups; torch's
    AdamW increments it in place once per group, so the bias correction would run ahead by a step per
    group and per update. tests/test_runtime_upstream.py fails once the tensors come back separate.
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

    Runs DeepSpeed's converter in a child process with parallel workers (converter_workers); ZeRO-1/2
    checkpoints lack its bookkeeping state, which it injects.
    """
    import subprocess
    import sys

    extract, merge = converter_workers(src)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(src),
        "--output_folder",
        str(dst),
        "--num_extract_workers",
        str(extract),
        "--num_merge_workers",
        str(merge),
        "--inject_missing_state",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"{src}: conversion to a universal checkpoint failed:\n{proc.stderr[-2000:]}")


def converter_workers(src: Path, cores: int | None = None, free_bytes: int | None = None) -> tuple[int, int]:
    """(extract, merge) worker processes for converting `src`: one extract worker per rank's optimizer
    file (each holds its file, about twice its size in memory) as far as cores and free memory allow;
    merge workers hold one parameter's pieces, and DeepSpeed advises fewer of them: half as many."""
    files = [f.stat().st_size for f in Path(src).glob("*optim_states.pt")]
    cores = cores or len(os.sched_getaffinity(0))
    free_bytes = _available_memory() if free_bytes is None else free_bytes
    by_memory = free_bytes // (2 * max(files)) if files and max(files) else cores
    extract = max(1, min(cores, len(files) or 1, by_memory))
    return extract, max(1, extract // 2)


def _available_memory() -> int:
    """Bytes of memory available to new work (Linux MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def lazy_state_dict(root: Path, tag: str) -> dict:
    """name -> lazy tensor (`.contiguous()` materialises one fp32 tensor) of a ZeRO-2/3 checkpoint.

    The optimizer files are memory-mapped, so a caller that converts and writes one tensor at a
    time holds about one tensor in RAM, not the model.
    """
    if not (Path(root) / tag).is_dir():
        raise CheckpointError(f"{root}/{tag}: checkpoint folder not found")
    return checkpoint_reader()(str(root), tag=tag, lazy_mode=True)


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (HF names) of a ZeRO checkpoint, in this process, without a process group."""
    if not (Path(root) / tag).is_dir():
        raise CheckpointError(f"{root}/{tag}: checkpoint folder not found")
    return checkpoint_reader()(str(root), tag=tag)


def checkpoint_reader() -> Callable:
    """DeepSpeed's reader of ZeRO checkpoints (`get_fp32_state_dict_from_zero_checkpoint`), imported now."""
    _quiet()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint
