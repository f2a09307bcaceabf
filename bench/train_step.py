"""Tokens/s of our DeepSpeed trainer step against a plain PyTorch loop, same model, batch and precision.

Both are measured in the same process, one after the other, on random tokens (so the data
loader is not part of either): the baseline is `LlamaForCausalLM` + torch AdamW (DDP over gloo/NCCL
when there are several ranks); ours is `pipeline.runtime.engine.Engine` with `ds_config` (ZeRO off =
stage 0, then the stages asked for). Prints one row per stage with the ratio ours / plain (tokens/s), and the plain loop measured a second
time at the end: the gap between the two plain rows is the noise of the machine.

    python bench/train_step.py                                   # world size 1, ZeRO 0 and 3
    DS_ACCELERATOR=cpu deepspeed -q --num_gpus 2 bench/train_step.py    # world size 2
    deepspeed --num_gpus 8 bench/train_step.py --model configs/model/llama_1b3.yaml --vocab 32000 \\
        --seq-len 2048 --micro 4 --precision bf16 --zero 3           # on GPUs: adds MFU
"""

from __future__ import annotations

import argparse
import os
import sys
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
from pipeline.runtime.config import BatchConfig, OptimConfig, ParallelConfig  # noqa: E402
from pipeline.runtime.engine import Engine, device_name, ds_config, init_distributed, param_groups  # noqa: E402

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
    """Seconds per optimizer step of a plain PyTorch loop (DDP when world size > 1)."""
    torch.manual_seed(0)
    model = build_model(mcfg, bos_id=2, eos_id=3, pad_id=0, partitioned=False).to(
        device, DTYPES[args.precision]
    )
    if dist.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    tokens = args.accum * args.micro * args.seq_len

    def step(k: int) -> None:
        for i in range(args.accum):
            mb = data[(k * args.accum + i) % len(data)]
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


def our_loop(args, mcfg: ModelConfig, data: list[dict], stage: int) -> float:
    """Seconds per optimizer step of Engine.forward_backward x accum + Engine.step."""
    torch.manual_seed(0)
    world = dist.world_size()
    cfg = ds_config(
        batch=BatchConfig(global_size=args.micro * args.accum * world, micro_size=args.micro),
        optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"),
        parallel=ParallelConfig(zero_stage=stage, precision=args.precision),
        total_steps=10**6,
        world_size=world,
    )
    engine = Engine(lambda: build_model(mcfg, bos_id=2, eos_id=3, pad_id=0), cfg)
    normalizer = float(args.accum * args.micro * args.seq_len * world)

    def step(k: int) -> None:
        for i in range(args.accum):
            engine.forward_backward(data[(k * args.accum + i) % len(data)], normalizer)
        engine.step()

    return timed(step, args)


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
    t = torch.tensor([sorted(times)[len(times) // 2]], dtype=torch.float64)
    return float(dist.all_reduce_max(t)[0])  # the slowest rank sets the pace


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
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
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

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
    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size()))
    data = batches(args, mcfg.vocab_size, 2 * args.accum)
    tokens = args.accum * args.micro * args.seq_len * dist.world_size()  # per optimizer step, all ranks
    peak = telemetry.peak_tflops(device_name(), args.precision)
    fpt = flops_per_token(mcfg, args.seq_len)
    base = plain_loop(args, mcfg, data, device)
    rows = [("plain PyTorch" + (" DDP" if dist.world_size() > 1 else ""), base)]
    for stage in args.zero:
        rows.append((f"ours, ZeRO-{stage}" if stage else "ours, ZeRO off", our_loop(args, mcfg, data, stage)))
    rows.append(("plain again (noise)", plain_loop(args, mcfg, data, device)))  # same loop, measured last
    if dist.is_main():
        print(
            f"\nworld size {dist.world_size()}, {device_name()}, {args.precision}, micro {args.micro} x accum "
            f"{args.accum} x seq {args.seq_len}, model {mcfg.num_layers} x {mcfg.hidden_size}"
        )
        print(f"{'loop':<22}{'tokens/s':>12}{'tok/s/dev':>12}{'vs plain':>10}{'MFU':>8}")
        for name, sec in rows:
            tok_s = tokens / sec
            mfu = telemetry.mfu(tok_s * fpt / dist.world_size() / 1e12, peak)
            mfu_s = mfu if isinstance(mfu, str) else f"{mfu:.1%}"
            print(f"{name:<22}{tok_s:>12.0f}{tok_s / dist.world_size():>12.0f}{base / sec:>10.3f}{mfu_s:>8}")
    sys.stdout.flush()
    dist.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # torch 2.13's gloo teardown can abort at interpreter exit (see notes)


if __name__ == "__main__":
    main()
