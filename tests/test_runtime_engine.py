"""ds_config as a pure dict (no processes) and the AdamW parameter groups."""

from __future__ import annotations

import os

import pytest

from pipeline.errors import ConfigError
from pipeline.model.build import build_model
from pipeline.model.config import ModelConfig
from pipeline.runtime.config import BatchConfig, OptimConfig, ParallelConfig
from pipeline.runtime.engine import ds_config, lr_scale_of, param_groups, precision_supported


def make(world_size=2, load_universal=False, device=None, adam="torch", **parallel):
    p = ParallelConfig(**parallel)
    p.validate()
    return ds_config(
        batch=BatchConfig(global_size=8, micro_size=2),
        optim=OptimConfig(lr=1e-3, grad_clip=0.5, adam=adam),
        parallel=p,
        total_steps=100,
        world_size=world_size,
        load_universal=load_universal,
        device=device,
    )


def test_zero3_bf16_dict():
    cfg = make()
    assert cfg["train_batch_size"] == 8
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"] == {"stage": 3}
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": True} and "fp16" not in cfg
    assert cfg["gradient_clipping"] == 0.5
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] is True
    assert opt["params"]["betas"] == [0.9, 0.95] and opt["params"]["weight_decay"] == 0.1
    assert "scheduler" not in cfg  # the LR is ours, set per step
    assert cfg["lr_schedule"] == {
        "lr": 1e-3,
        "min_lr": 1e-4,
        "warmup_steps": 10,
        "total_steps": 100,
        "schedule": "cosine",
        "decay_fraction": 0.2,
    }
    assert "checkpoint" not in cfg and "tensor_parallel" not in cfg


def test_precisions_and_parallel_blocks():
    assert "bf16" not in make(precision="fp32") and "fp16" not in make(precision="fp32")
    fp16 = make(precision="fp16", fp16_initial_scale_power=12, fp16_loss_scale_window=50)["fp16"]
    assert fp16 == {
        "enabled": True,
        "loss_scale": 0,  # 0 = dynamic
        "initial_scale_power": 12,
        "loss_scale_window": 50,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    for stage in (1, 2, 3):
        assert make(zero_stage=stage)["zero_optimization"] == {"stage": stage}
    tp = make(world_size=4, tp_size=2, zero_stage=1)
    assert tp["tensor_parallel"] == {"autotp_size": 2} and tp["gradient_accumulation_steps"] == 2
    assert tp["train_batch_size"] == 16  # DeepSpeed's arithmetic: micro 2 x accum 2 x 4 ranks
    assert make(world_size=2, tp_size=2, zero_stage=2)["gradient_accumulation_steps"] == 4  # dp 1
    assert make(activation_checkpointing=True)["activation_checkpointing"] == {"partition_activations": False}
    assert make(world_size=1)["gradient_accumulation_steps"] == 4
    assert make(load_universal=True)["checkpoint"] == {"load_universal": True}


def test_offload_blocks():
    z3 = make(offload_optimizer=True, offload_params=True)
    assert z3["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
    }
    assert z3["optimizer"]["params"]["torch_adam"] is False  # ZeRO-Offload steps with DeepSpeed's CPU Adam
    z2 = make(zero_stage=2, offload_optimizer=True)["zero_optimization"]
    assert z2 == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}


@pytest.mark.parametrize(
    ("parallel", "key", "hint"),
    [
        ({"tp_size": 2, "zero_stage": 3}, "tp_size", "zero_stage 0, 1 or 2"),
        ({"offload_params": True, "zero_stage": 2}, "offload_params", "zero_stage 3 with offload_params"),
        ({"offload_optimizer": True, "zero_stage": 0}, "offload_optimizer", "1, 2 or 3"),
        ({"tp_size": 2, "zero_stage": 1, "offload_optimizer": True}, "tp_size", "tp_size 1 with offload"),
        ({"tp_size": 0}, "tp_size", ">= 1"),
    ],
)
def test_unsupported_combinations_name_the_alternative(parallel, key, hint):
    with pytest.raises(ConfigError) as err:
        ParallelConfig(**parallel).validate()
    assert err.value.key == key and hint in err.value.msg


def test_indivisible_batch_names_the_key():
    with pytest.raises(ConfigError) as err:
        make(world_size=3)
    assert err.value.key == "batch.global_size" and "2 x 3 = 6" in str(err.value)


def test_param_groups_skip_norms():
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_heads=2, max_seq_len=8)
    model = build_model(cfg, bos_id=2, eos_id=3, pad_id=0, partitioned=False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * cfg.num_layers + 1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_param_groups_give_named_parameters_their_lr_scale():
    """A new head (`score`) gets its own groups with an LR multiplier, whatever the prefix peft adds."""
    from finetune_helpers import tiny_llama

    model = tiny_llama("classify")
    groups = param_groups(model, 0.1, {"score": 10.0})
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.1, 1.0), (0.0, 1.0), (0.1, 10.0)]
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups[2]["params"]] == ["score.weight"]
    assert lr_scale_of("base_model.model.score.modules_to_save.default.weight", {"score": 3.0}) == 3.0
    assert lr_scale_of("model.layers.0.scoreboard.weight", {"score": 3.0}) == 1.0  # whole components only


def test_warmup_as_a_fraction_of_the_run():
    """optim.warmup_fraction scales with the schedule's length; warmup_steps stays possible."""
    for fraction, total, want in ((0.1, 100, 10), (0.1, 333, 33), (0.0, 50, 0), (None, 50, 10)):
        optim = OptimConfig(warmup_fraction=fraction)
        optim.validate()
        cfg = ds_config(
            batch=BatchConfig(),
            optim=optim,
            parallel=ParallelConfig(),
            total_steps=total,
            world_size=1,
            device="cpu",
        )
        assert cfg["lr_schedule"]["warmup_steps"] == want, (fraction, total)
    fixed = OptimConfig(warmup_fraction=0.1, schedule_steps=1000)  # the schedule's length, not the run's
    assert fixed.warmup_for(fixed.schedule_steps) == 100
    with pytest.raises(ConfigError, match="warmup_fraction: must be in"):
        OptimConfig(warmup_fraction=1.0).validate()


def test_precision_supported_fp32_and_bf16():
    assert precision_supported("fp32") and precision_supported("bf16")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_default_optimizer_needs_no_compiled_op(device, precision):
    """torch's AdamW on every device (fused CUDA kernel on GPUs), never DeepSpeed's JIT-built Adam;
    gradients are reduced in the training precision."""
    cfg = make(device=device, precision=precision)
    params = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True
    assert params.get("fused", False) is (device == "cuda")
    assert cfg["communication_data_type"] == precision


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deepspeed_adam_and_offload_are_a_choice(device):
    ds_adam = make(device=device, adam="deepspeed")["optimizer"]["params"]  # FusedAdam / CPU Adam
    assert ds_adam["torch_adam"] is False and "fused" not in ds_adam
    offload = make(device=device, offload_optimizer=True)["optimizer"]["params"]
    assert offload["torch_adam"] is False  # ZeRO-Offload steps with DeepSpeed's CPU Adam
    assert make(device=device, reduce_fp32=True)["communication_data_type"] == "fp32"
    assert make(device=device, precision="fp32", reduce_fp32=True)["communication_data_type"] == "fp32"
    with pytest.raises(ConfigError, match="collective_timeout_min"):
        ParallelConfig(collective_timeout_min=0).validate()


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """A `nvidia-smi` on PATH that lists two GPUs, with no CUDA_VISIBLE_DEVICES and no DS_ACCELERATOR."""
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho 'GPU 1: NVIDIA H100 (UUID: b)'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


def test_a_cpu_accelerator_on_a_node_with_gpus_is_refused(fake_nvidia_smi, monkeypatch):
    """A CPU build of torch where nvidia-smi lists GPUs (setup run on a login node): fail, don't
    train on the CPU; DS_ACCELERATOR=cpu is the way to ask for the CPU."""
    from pipeline.runtime.engine import check_accelerator, visible_gpus

    assert visible_gpus() == (2, "nvidia-smi -L")
    with pytest.raises(ConfigError, match=r"DS_ACCELERATOR: this node shows 2 GPU\(s\) \(nvidia-smi -L\)"):
        check_accelerator()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")  # Slurm's binding wins over nvidia-smi
    with pytest.raises(
        ConfigError, match=r"3 GPU\(s\) \(CUDA_VISIBLE_DEVICES=3,5,7\).*launch/setup.sh --cuda"
    ):
        check_accelerator()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    check_accelerator()  # asked for
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    check_accelerator()  # GPUs hidden on purpose


def test_converter_workers_follow_rank_files_cores_and_memory(tmp_path):
    from pipeline.runtime.engine import converter_workers

    for r in range(8):  # 8 ranks' optimizer files of 1000 bytes
        (tmp_path / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    assert converter_workers(tmp_path, cores=16, free_bytes=10**9) == (8, 4)  # one per file
    assert converter_workers(tmp_path, cores=4, free_bytes=10**9) == (4, 2)  # no more than cores
    assert converter_workers(tmp_path, cores=16, free_bytes=6000) == (3, 1)  # each holds ~2x its file
    assert converter_workers(tmp_path, cores=16, free_bytes=100) == (1, 1)
    assert converter_workers(tmp_path / "none", cores=16, free_bytes=10**9) == (1, 1)
