"""PEFT methods through peft, in process on a tiny Llama (no DeepSpeed): for LoRA, IA3, prefix and
prompt tuning, as a causal LM and as a classifier, only the method's parameters (and a new head)
change in training; export merges LoRA/IA3 with equal logits, and writes base + adapter folders for
prefix/prompt that `PeftModel.from_pretrained` reloads with equal logits; QLoRA is refused without
CUDA; config errors name the key."""

from __future__ import annotations

import pytest
import torch
from finetune_helpers import tiny_llama

from pipeline.config import load_config
from pipeline.errors import CheckpointError, ConfigError
from pipeline.finetune.adapters import (
    MERGEABLE,
    apply_peft,
    count_params,
    export_unmerged,
    load_adapter_state,
    merge_checked,
    pad_left,
    peft_config,
    quantization_config,
    without_adapters,
)
from pipeline.finetune.config import FinetuneConfig, PeftSection

METHODS = ["lora", "ia3", "prefix", "prompt"]
OWN = {
    "lora": (".lora_A.", ".lora_B."),
    "ia3": (".ia3_l.",),
    "prefix": ("prompt_encoder.",),
    "prompt": ("prompt_encoder.",),
}
SECTION = PeftSection(rank=4, alpha=8, num_virtual_tokens=4)
IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 2], [1, 30, 31, 40, 41, 50, 51, 2]])  # (B, T), no padding
CLASSES = torch.tensor([0, 2])


def train(model, task: str, steps: int = 3) -> None:
    """A few AdamW steps on the fixed batch (LoRA needs two: B moves off zero, then A gets gradients)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = CLASSES if task == "classify" else IDS
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("task", ["sft", "classify"])
@pytest.mark.parametrize("method", METHODS)
def test_only_the_methods_parameters_change(method, task):
    if (method, task) == ("prefix", "classify"):
        with pytest.raises(ConfigError, match="method: prefix tuning of a classifier"):
            apply_peft(tiny_llama(task), method, SECTION, task)
        return
    model = apply_peft(tiny_llama(task), method, SECTION, task)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    own = {n for n in trainable if any(tag in n for tag in OWN[method])}
    assert own and count_params(model)[0] < count_params(model)[1] / 5
    heads = trainable - own
    assert all(".score.modules_to_save." in n for n in heads) and len(heads) == (task == "classify")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, task)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == trainable


def test_lora_parameter_count_and_targets():
    model = apply_peft(
        tiny_llama("sft"), "lora", PeftSection(rank=4, target_modules=["q_proj", "v_proj"]), "sft"
    )
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
    # 2 layers x (q: A 4x32 + B 32x4, v: A 4x32 + B 16x4); v_proj is 2 kv heads x 8 = 16 wide
    assert count_params(model)[0] == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    ia3 = peft_config("ia3", PeftSection(), "sft")
    assert set(ia3.target_modules) == {"k_proj", "v_proj", "down_proj"} and set(ia3.feedforward_modules) == {
        "down_proj"
    }


@pytest.mark.parametrize("task", ["sft", "classify"])
@pytest.mark.parametrize("method", METHODS)
def test_export_reloads_with_equal_logits(method, task, tmp_path):
    """Trained, saved as a state dict (what the checkpoint holds), rebuilt on a fresh base, exported,
    reloaded with plain transformers (+ peft for prefix/prompt): the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if (method, task) == ("prefix", "classify"):
        return  # refused (test above)
    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    model = apply_peft(tiny_llama(task), method, SECTION, task)
    train(model, task)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    rebuilt = load_adapter_state(tiny_llama(task, seed=1), method, SECTION, task, model.state_dict())
    if method in MERGEABLE:
        merged = merge_checked(rebuilt, IDS, atol=1e-5)
        assert not any(
            tag in n for n, _ in merged.named_parameters() for tag in (*OWN[method], "modules_to_save")
        )
        merged.save_pretrained(tmp_path / "hf")
        reloaded = auto.from_pretrained(tmp_path / "hf").eval()
    else:
        export_unmerged(rebuilt, tmp_path / "hf", tmp_path / "adapter", IDS)
        base = auto.from_pretrained(tmp_path / "hf").eval()
        untouched = tiny_llama(task).state_dict()  # the frozen base really is the starting model
        for k, v in base.state_dict().items():
            if not k.startswith("score."):  # a classifier's trained head lives in the adapter
                assert torch.equal(v, untouched[k]), k
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)


def test_state_of_another_method_is_a_checkpoint_error():
    state = apply_peft(tiny_llama("sft"), "lora", SECTION, "sft").state_dict()
    with pytest.raises(CheckpointError, match="ia3 checkpoint does not match"):
        load_adapter_state(tiny_llama("sft"), "ia3", SECTION, "sft", state)


def test_prompt_tuned_classifier_needs_left_padding():
    model = apply_peft(tiny_llama("classify"), "prompt", SECTION, "classify").eval()
    short = torch.tensor([[1, 5, 9, 2]])
    batch = {"input_ids": torch.tensor([[1, 5, 9, 2, 0, 0], [1, 8, 8, 8, 8, 2]])}
    batch["attention_mask"] = (batch["input_ids"] != 0).long()
    left = pad_left(batch)
    assert left["input_ids"].tolist() == [[0, 0, 1, 5, 9, 2], [1, 8, 8, 8, 8, 2]]
    with torch.no_grad():
        alone = model(input_ids=short).logits[0]
        right_padded = model(**batch).logits[0]
        left_padded = model(**left).logits[0]
    # equal up to rounding of rotary angles at shifted positions (~3e-4 here); right padding is off by ~0.2
    torch.testing.assert_close(left_padded, alone, atol=2e-3, rtol=0)
    assert not torch.allclose(right_padded, alone, atol=2e-2)  # pooled a padding position


@pytest.mark.parametrize("method", METHODS)
def test_without_adapters_computes_as_the_base(method):
    """What DPO's reference pass relies on: the starting model, whatever the method added."""
    model = apply_peft(tiny_llama("sft"), method, SECTION, "sft")
    train(model, "sft", steps=2)
    with torch.no_grad(), without_adapters(model):
        plain = model(input_ids=IDS).logits
    with torch.no_grad():
        torch.testing.assert_close(plain, tiny_llama("sft")(input_ids=IDS).logits)
        assert not torch.allclose(model(input_ids=IDS).logits[:, -IDS.shape[1] :], plain, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_is_a_lora_config_refused_without_cuda():
    cfg = peft_config("qlora", PeftSection(rank=4), "sft")
    assert type(cfg).__name__ == "LoraConfig" and cfg.r == 4
    for call in (
        lambda: apply_peft(tiny_llama("sft"), "qlora", SECTION, "sft"),
        lambda: quantization_config(SECTION),
    ):
        with pytest.raises(ConfigError, match="method: qlora .* needs a CUDA GPU"):
            call()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"peft.target_modules: \['qkv'\] are not modules"):
        apply_peft(tiny_llama("sft"), "lora", PeftSection(target_modules=["q_proj", "qkv"]), "sft")
    with pytest.raises(ConfigError, match=r"peft.feedforward_modules: \['up_proj'\] are not among"):
        apply_peft(tiny_llama("sft"), "ia3", PeftSection(feedforward_modules=["up_proj"]), "sft")
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text("{}")
    cfg = load_config(FinetuneConfig, None, [f"init_from={init}", "method=lora", "peft.rank=4"])
    assert cfg.peft.rank == 4 and not hasattr(cfg, "lora")  # one name for the section
    with pytest.raises(ConfigError, match=r"lora: unknown key \(known: .*peft"):
        load_config(FinetuneConfig, None, [f"init_from={init}", "lora.rank=4"])
    with pytest.raises(ConfigError, match="data.pack: prompt tuning"):
        load_config(FinetuneConfig, None, [f"init_from={init}", "method=prompt", "data.pack=true"])
    assert load_config(FinetuneConfig, None, [f"init_from={init}", "method=ia3"]).method == "ia3"
    with pytest.raises(ConfigError, match="feedforward_modules"):
        PeftSection(target_modules=["k_proj"], feedforward_modules=["down_proj"]).validate()
