"""Tokens/s of our training step against a plain PyTorch loop, same model, batch and precision.

Both are measured in the same process, one after the other, on random tokens (so the data
loader is not part of either). The baseline is `LlamaForCausalLM` + torch AdamW (DDP over
gloo/NCCL when there are several ranks) with fp32 master weights, like DeepSpeed's: fp32 parameters
and optimizer, bf16 compute under torch.autocast for `--precision bf16`. Ours is the production
step, `pipeline.runtime.loop.Loop.train_step` (the task's loss, the engine's backward/step, the
loss all-reduce and skip decision, the background batch fetch) on `Engine` with `ds_config` (ZeRO
off = stage 0, then the stages asked for). Each rank binds its own accelerator device first.
Prints one row per stage with the ratio ours / plain (tokens/s), and the plain loop measured a
second time at the end: the gap between the two plain rows is the noise of the machine.

    python bench/train_step.py                                   # world size 1, ZeRO 0 and 3
    DS_ACCELERATOR=cpu deepspeed -q --num_gpus 2 bench/train_step.py    # world size 2
    deepspeed --num_gpus 8 bench/train_step.py --model configs/model/llama_1b3.yaml --vocab 32000 \\
        --seq-len 2048 --micro 4 --precision bf16 --zero 3           # on GPUs: adds MFU
    python bench/train_step.py ... --json out.json                   # the rows for a script (gpu_acceptance.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import dist  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.model.build import build_model  # noqa: E402
from pipeline.model.config import ModelConfig  # noqa: E402
from pipeline.model.flops import flops_per_token  # noqa: E402
from pipeline.runtime import telemetry  # noqa: E402
from pipeline.runtime.checkpoint import TrainerState  # noqa: E402
from pipeline.runtime.config import BatchConfig, LoopConfig, OptimConfig, ParallelConfig  # noqa: E402
from pipeline.runtime.engine import Engine, device_name, ds_config, init_distributed, param_groups  # noqa: E402
from pipeline.runtime.faults import Faults, StopRequest  # noqa: E402
from pipeline.runtime.loop import Loop, LoopSettings  # noqa: E402
from pipeline.runtime.metrics import MetricsWriter  # noqa: E402
from pipeline.runtime.task import Task, count_lm_targets, lm_loss_sum  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def batches(args, vocab: int, n: int) -> list[dict]:
    """n micro batches of random tokens, the same on both sides (seeded per rank)."""
    g = torch.Generator().manual_seed(1000 + dist.rank())
    out = []
    for _ in range(n):
        x = torch.randint(4, vocab, (args.micro, args.seq_len + 1), generator=g)
        out.append({"input_ids": x[:, :-1].contiguous(), "shift_labels": x[:, 1:].contiguous()})
    return out


def plain_loop(args, mcfg: ModelConfig, data: list[dict], device: torch.device) -> float:
    """Seconds per optimizer step of a plain PyTorch loop: fp32 weights and AdamW state, bf16
    compute under autocast for --precision bf16 (DDP when world size > 1)."""
    torch.manual_seed(0)
    model = build_model(mcfg, bos_id=2, eos_id=3, pad_id=0, partitioned=False).to(device, torch.float32)
    if dist.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    tokens = args.accum * args.micro * args.seq_len
    half = args.precision == "bf16"

    def step(k: int) -> None:
        for i in range(args.accum):
            mb = data[(k * args.accum + i) % len(data)]
            sync_grads = (
                model.no_sync() if dist.world_size() > 1 and i < args.accum - 1 else contextlib.nullcontext()
            )
            with sync_grads, torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
                logits = model(input_ids=mb["input_ids"].to(device)).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)),
                    mb["shift_labels"].to(device).reshape(-1),
                    reduction="sum",
                )
                (loss / (tokens * dist.world_size())).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, args)


class BenchTask(Task):
    """The bench's random batches as a task: step k takes micro batches k*accum .. k*accum+accum-1."""

    name = "bench"

    def __init__(self, data: list[dict], accum: int):
        self.data, self.accum, self.info = data, accum, {}

    def micro_batches(self, step: int, dp_rank: int, dp_size: int) -> list[dict]:
        return [self.data[(step * self.accum + i) % len(self.data)] for i in range(self.accum)]

    def count_targets(self, batch: dict) -> int:
        return count_lm_targets(batch)

    def loss_sum(self, engine: Engine, batch: dict) -> torch.Tensor:
        return lm_loss_sum(engine, batch)


def our_loop(args, mcfg: ModelConfig, data: list[dict], stage: int, run_dir: Path) -> float:
    """Seconds per optimizer step of the production loop's train_step on Engine."""
    torch.manual_seed(0)
    world = dist.world_size()
    batch = BatchConfig(global_size=args.micro * args.accum * world, micro_size=args.micro)
    cfg = ds_config(
        batch=batch,
        optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"),
        parallel=ParallelConfig(zero_stage=stage, precision=args.precision),
        total_steps=10**6,
        world_size=world,
    )
    engine = Engine(lambda: build_model(mcfg, bos_id=2, eos_id=3, pad_id=0), cfg)
    settings = LoopSettings(run_dir, batch, LoopConfig(progress=False), 10**6, args.precision)
    loop = Loop(
        settings,
        BenchTask(data, args.accum),
        engine,
        TrainerState(),
        MetricsWriter(run_dir, tensorboard=False),
        StopRequest(),
        Faults(),
    )
    try:
        return timed(lambda k: loop.train_step(), args)
    finally:
        loop.close()


def timed(step, args) -> float:
    """Median seconds per step over args.steps steps after args.warmup untimed ones (synchronised)."""
    for k in range(args.warmup):
        step(k)
    times = []
    for k in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step(args.warmup + k)
        sync()
        times.append(time.perf_counter() - t0)
    return dist.max_floats([sorted(times)[len(times) // 2]])[0]  # the slowest rank sets the pace


def sync() -> None:
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="configs/model/*.yaml (default: 4 x 256 Llama)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--precision", choices=list(DTYPES), default="fp32")
    p.add_argument("--zero", type=int, nargs="+", default=[0, 3], help="ZeRO stages to measure (0 = off)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    dist.bind_device()  # this rank's own GPU, before anything touches one
    init_distributed()
    if args.model:
        mcfg = load_config(
            ModelConfig, args.model, [f"vocab_size={args.vocab}", f"max_seq_len={args.seq_len}"]
        )
    else:
        mcfg = ModelConfig(
            vocab_size=args.vocab,
            hidden_size=256,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            max_seq_len=args.seq_len,
        )
    device = dist.device()
    if "OMP_NUM_THREADS" not in os.environ:  # host threads split between the ranks of this node
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size()))
    data = batches(args, mcfg.vocab_size, 2 * args.accum)
    tokens = args.accum * args.micro * args.seq_len * dist.world_size()  # per optimizer step, all ranks
    peak = telemetry.peak_tflops(device_name(), args.precision)
    fpt = flops_per_token(mcfg, args.seq_len)
    base = plain_loop(args, mcfg, data, device)
    rows = [("plain PyTorch" + (" DDP" if dist.world_size() > 1 else ""), base)]
    run_dir = Path(tempfile.mkdtemp(prefix="gristmill-bench-"))  # the loop's metrics writer wants a folder
    for stage in args.zero:
        name = f"ours, ZeRO-{stage}" if stage else "ours, ZeRO off"
        rows.append((name, our_loop(args, mcfg, data, stage, run_dir)))
    rows.append(("plain again (noise)", plain_loop(args, mcfg, data, device)))  # same loop, measured last
    if dist.is_main():
        print(
            f"\nworld size {dist.world_size()}, {device_name()}, {args.precision}, micro {args.micro} x accum "
            f"{args.accum} x seq {args.seq_len}, model {mcfg.num_layers} x {mcfg.hidden_size}"
        )
        print(f"{'loop':<22}{'tokens/s':>12}{'tok/s/dev':>12}{'TFLOP/s/dev':>13}{'vs plain':>10}{'MFU':>8}")
        table = []
        for name, sec in rows:
            tok_s = tokens / sec
            tflops = tok_s * fpt / dist.world_size() / 1e12  # model FLOPs (6N + attention) per device
            mfu = telemetry.mfu(tflops, peak)
            mfu_s = mfu if isinstance(mfu, str) else f"{mfu:.1%}"
            print(
                f"{name:<22}{tok_s:>12.0f}{tok_s / dist.world_size():>12.0f}{tflops:>13.1f}"
                f"{base / sec:>10.3f}{mfu_s:>8}"
            )
            table.append(
                {
                    "loop": name,
                    "tokens_per_s": tok_s,
                    "tflops_per_device": tflops,
                    "vs_plain": base / sec,
                    "mfu": mfu,
                }
            )
        if args.json:
            args.json.write_text(
                json.dumps({"device": device_name(), "precision": args.precision, "rows": table})
            )
    sys.stdout.flush()
    shutil.rmtree(run_dir, ignore_errors=True)
    dist.shutdown()
    os._exit(0)  # torch 2.13's gloo teardown can abort at interpreter exit (see notes)


if __name__ == "__main__":
    main()
