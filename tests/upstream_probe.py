"""A 1-rank run for tests/test_runtime_upstream.py: train a step of a tiny ZeRO-3 model with two AdamW
groups (weight decay 0.1 and 0.0), save, convert to a universal checkpoint, then load it twice into
fresh engines: once with DeepSpeed's bare load_checkpoint, once with Engine.load. Prints one JSON line
with what each load left in the optimizer.

    python tests/upstream_probe.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.model.build import build_model  # noqa: E402
from pipeline.model.config import ModelConfig  # noqa: E402
from pipeline.runtime.config import BatchConfig, OptimConfig, ParallelConfig  # noqa: E402
from pipeline.runtime.engine import Engine, ds_config  # noqa: E402
from pipeline.runtime.task import lm_loss_sum  # noqa: E402

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, max_seq_len=16)


def engine(universal: bool) -> Engine:
    cfg = ds_config(
        batch=BatchConfig(global_size=2, micro_size=2),
        optim=OptimConfig(weight_decay=0.1, warmup_steps=0),
        parallel=ParallelConfig(zero_stage=3, precision="fp32"),
        total_steps=10,
        world_size=1,
        load_universal=universal,
    )
    torch.manual_seed(0)
    return Engine(lambda: build_model(MODEL, bos_id=1, eos_id=2, pad_id=0), cfg)


def observe(e: Engine) -> dict:
    """Each group's weight decay, and whether the Adam step tensors are one shared object."""
    inner = e.ds.optimizer.optimizer
    steps = [st["step"] for st in inner.state.values() if torch.is_tensor(st.get("step"))]
    return {
        "weight_decay": [g["weight_decay"] for g in e.ds.optimizer.param_groups],
        "steps": len(steps),
        "step_objects": len({id(t) for t in steps}),
    }


def main() -> None:
    root = Path(sys.argv[1])
    first = engine(universal=False)
    ids = torch.randint(3, 64, (2, 16))
    first.backward(lm_loss_sum(first, {"input_ids": ids, "labels": ids}), normalizer=2 * 15)
    first.step()
    first.save(root, "step_1", {})
    before = observe(first)

    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", "--input_folder", str(root / "step_1"), "--output_folder", str(root / "u")]
    sys.argv += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
    ds_to_universal.main(ds_to_universal.parse_arguments())

    bare = engine(universal=True)
    bare.ds.load_checkpoint(str(root), tag="u")
    ours = engine(universal=True)
    ours.load(root, "u")
    print(json.dumps({"saved": before, "bare": observe(bare), "ours": observe(ours)}), flush=True)
    os._exit(0)  # torch's gloo teardown can abort at exit (see runtime/worker.py)


if __name__ == "__main__":
    main()
