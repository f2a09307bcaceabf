"""LoRA through peft, in process (no DeepSpeed): only adapter weights get gradients and change in a
training step, unknown target modules are a config error, and merging keeps the logits."""

from __future__ import annotations

import pytest
import torch
from finetune_helpers import ft_init  # noqa: F401

from pipeline.errors import CheckpointError, ConfigError
from pipeline.finetune.config import LoraSection
from pipeline.finetune.lora import apply_lora, count_params, load_lora_state, merge_checked


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_only_adapters_train(ft_init):  # noqa: F811
    model = apply_lora(
        _model(ft_init), LoraSection(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]), "sft"
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    # 2 layers x 2 modules x (A: 4 x 64 in, B: out x 4); v_proj's output is 2 kv heads x 16 = 32 wide
    assert count_params(model)[0] == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([list(range(1, 33))])
    for _ in range(2):  # two steps: B moves off zero first, then A gets gradients too
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == trainable


def test_merge_keeps_logits_and_state_round_trips(ft_init):  # noqa: F811
    section = LoraSection(rank=4, alpha=16)
    model = apply_lora(_model(ft_init), section, "sft")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # as if trained: B = 0 would make the merge trivial
    state = model.state_dict()
    ids = torch.tensor([list(range(1, 25))])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    rebuilt = load_lora_state(_model(ft_init), section, "sft", state)
    merged = merge_checked(rebuilt, ids)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="LoRA checkpoint does not match"):
        load_lora_state(_model(ft_init), LoraSection(rank=4, target_modules=["q_proj"]), "sft", state)


def test_unknown_target_module_is_a_config_error(ft_init):  # noqa: F811
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['qkv'\] are not modules"):
        apply_lora(_model(ft_init), LoraSection(target_modules=["q_proj", "qkv"]), "sft")
