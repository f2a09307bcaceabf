"""The --check memory estimator (pipeline/train/memory.py) and plan (train/plan.py): pure arithmetic,
compared with DeepSpeed's own ZeRO-3 estimator and with the real model's parameter layout."""

from __future__ import annotations

import re

import pytest
import torch
from dist_helpers import REPO

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model.build import llama_config
from pipeline.model.config import ModelConfig
from pipeline.model.flops import num_params
from pipeline.runtime.config import ParallelConfig
from pipeline.train.config import PretrainConfig
from pipeline.train.memory import activations, estimate, largest_module_params, model_states
from pipeline.train.plan import plan

TINY_CPU = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"


def model(name: str, vocab: int = 32000) -> ModelConfig:
    return load_config(ModelConfig, REPO / "configs" / "model" / f"{name}.yaml", [f"vocab_size={vocab}"])


@pytest.mark.parametrize(
    ("stage", "precision", "dp", "tp", "states", "grads16"),
    [
        (0, "bf16", 8, 1, 18.0, 2.0),  # 2 weights + 4 fp32 grads + 12 master/Adam; 16-bit grads apart
        (1, "bf16", 8, 1, 2 + 16 / 8, 2.0),
        (2, "bf16", 8, 1, 2 + 16 / 8, 2 / 8),
        (3, "bf16", 8, 1, 18 / 8, 2 / 8),  # DeepSpeed's estimator: 18 / N
        (3, "fp32", 4, 1, 16 / 4, 0.0),  # 4 + 4 + 8 (no master copy)
        (1, "bf16", 2, 2, (2 + 16 / 2) / 2, 2 / 2),  # AutoTP halves everything first
    ],
)
def test_model_state_memory_per_device(stage, precision, dp, tp, states, grads16):
    assert model_states(1000, stage, precision, dp, tp) == pytest.approx((1000 * states, 1000 * grads16))


def deepspeed_zero3_per_gpu(total: int, largest: int, gpus: int, capsys) -> float:
    """Bytes per GPU from estimate_zero3_model_states_mem_needs_all_cold, row without offload."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    per_node = min(gpus, 8)
    estimate_zero3_model_states_mem_needs_all_cold(
        total, largest, num_gpus_per_node=per_node, num_nodes=gpus // per_node
    )
    out = capsys.readouterr().out
    row = next(
        line for line in out.splitlines() if "offload_param=none, offload_optimizer=none, zero_init=1" in line
    )
    return float(re.findall(r"([\d.]+)GB", row)[1]) * 2**30


def meta_model_counts(m: ModelConfig) -> tuple[int, int]:
    """(parameters, largest module's own parameters) of the real transformers model, on the meta
    device, counted as DeepSpeed's model_to_params does (a tied weight once)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        net = LlamaForCausalLM(llama_config(m, bos_id=1, eos_id=2, pad_id=0))
    total = sum({id(p): p.numel() for p in net.parameters()}.values())
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in net.modules())
    return total, largest


@pytest.mark.parametrize("name", ["llama_125m", "llama_1b3", "llama_7b"])
def test_zero3_model_states_within_10_percent_of_deepspeeds_estimator(name, capsys):
    m = model(name)
    total, largest = meta_model_counts(m)
    assert num_params(m) == total and largest_module_params(m) == largest  # the shape arithmetic is exact
    for gpus in (1, 8, 64):
        states, _ = model_states(total, 3, "bf16", gpus)
        ours = states + 2 * 2 * largest  # + the largest module gathered: weights and gradients
        theirs = deepspeed_zero3_per_gpu(total, largest, gpus, capsys)
        assert ours == pytest.approx(theirs, rel=0.10), (name, gpus, ours / theirs)


def test_activation_memory_follows_the_layer_shapes():
    """Korthikanti et al.'s per-layer count, redone for Llama: twice the tokens, twice the bytes;
    checkpointing keeps one layer's worth plus every layer's input."""
    m = model("llama_1b3")
    one = activations(m, 2048, 1, 1, "bf16", checkpointing=False)
    assert activations(m, 2048, 2, 1, "bf16", checkpointing=False) == pytest.approx(2 * one)
    assert activations(m, 2048, 1, 1, "fp32", checkpointing=False) > 1.6 * one
    per_layer = 2048 * (8 * 2048 + 4 * 2048 + 4 * 1024 + 8 * 5632)  # h 2048, kv width 8 x 128, f 5632
    loss = 2048 * 32000 * 10
    assert one == pytest.approx(24 * per_layer + loss)
    ckpt = activations(m, 2048, 1, 1, "bf16", checkpointing=True)
    assert ckpt == pytest.approx(24 * 2048 * 2048 * 2 + per_layer + loss) and ckpt < one / 3
    assert activations(m, 2048, 1, 2, "bf16", checkpointing=False) < one  # AutoTP shards the MLP


def test_offload_moves_optimizer_state_to_the_host():
    m = model("llama_1b3")
    p = num_params(m)
    on_gpu = estimate(m, p, parallel=ParallelConfig(), seq_len=2048, micro=1, dp=8)
    off = estimate(
        m,
        p,
        parallel=ParallelConfig(offload_optimizer=True, offload_params=True),
        seq_len=2048,
        micro=1,
        dp=8,
    )
    assert off.states == pytest.approx(0) and off.buffers == pytest.approx(on_gpu.buffers)
    assert off.host == pytest.approx(p * (16 + 2) / 8) and on_gpu.host == 0


def check(*overrides: str, **target) -> str:
    cfg = load_config(PretrainConfig, TINY_CPU, list(overrides))
    return plan(cfg, target.pop("world_size", 64), **target)


def test_check_plans_for_a_target_without_token_shards():
    """--check --world-size 64 --device h100 --vocab 32000: no manifest, no GPU, no process group."""
    out = check(
        f"model.file={REPO / 'configs/model/llama_7b.yaml'}",
        "data.tokens=/nonexistent/tokens",
        "data.seq_len=4096",
        "batch.global_size=512",
        "batch.micro_size=1",
        device="h100",
        vocab=32000,
    )
    assert "NVIDIA H100" in out and "64 ranks (8 nodes x 8) = data parallel 64 x tensor parallel 1" in out
    assert "global 512 = micro 1 x dp 64 x grad accum 8" in out and "7,241,732,096 params" in out
    assert re.search(r"model states +1\.90 GiB", out) and re.search(r"with act\. ckpt +2\.86 GiB", out)
    assert "fits in 72.00 GiB usable of 80 GB" in out
    assert not torch.distributed.is_initialized()


def test_check_says_what_does_not_fit_and_refuses_what_the_target_cannot_run():
    big = (
        "model.file=" + str(REPO / "configs/model/llama_7b.yaml"),
        "data.seq_len=4096",
        "batch.micro_size=8",
    )
    out = check(*big, "batch.global_size=512", device="a100-40", vocab=32000)
    assert "DOES NOT FIT in 36.00 GiB usable of 40 GB" in out and "with it" in out
    with pytest.raises(ConfigError, match="parallel.precision: bf16 does not train on NVIDIA V100"):
        check(device="v100", vocab=32000)
    with pytest.raises(ConfigError, match="unknown device 'b200'"):
        check(device="b200", vocab=32000)
    with pytest.raises(ConfigError, match="data.tokens: no manifest.json in /nowhere"):
        check("data.tokens=/nowhere", device="h100")
