"""DPO: preference records in every shape (counted skips), encoding with the loss on the answer only,
our loss, log-probs and reward metrics equal to TRL's on the same batch (sigmoid and IPO), the
reference pass (sharded like the loop shards it) and its file, and a tiny model whose held-out
reward margin grows under DPO."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from finetune_helpers import ft_init, ft_tok, tiny_llama  # noqa: F401  (fixtures)

from pipeline.errors import CheckpointError
from pipeline.finetune import dpo, sft
from pipeline.finetune.config import DPOSection
from pipeline.finetune.preferences import (
    Pair,
    Preference,
    encode_preferences,
    load_preferences,
    pair_key,
    prompt_key,
    to_preferences,
)
from pipeline.finetune.records import Chat, Example, split_examples
from pipeline.finetune.sft import IGNORE_INDEX

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Count to three."},
]
CHAT_PROMPT = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Count to three."))
RECORDS = [
    {"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": "No."},
    {"instruction": "翻译成中文", "input": "cat", "chosen": "猫", "rejected": "狗", "system": "你是翻译。"},
    {"messages": HISTORY, "chosen": "One, two, three.", "rejected": "Four."},
    {
        "conversations": [{"from": "human", "value": "写一首诗。"}],
        "chosen": {"from": "gpt", "value": "床前明月光，疑是地上霜。"},
        "rejected": {"from": "gpt", "value": "不要。"},
    },
    {  # implicit prompt: two full conversations sharing their first turns
        "chosen": [*HISTORY, {"role": "assistant", "content": "One, two, three."}],
        "rejected": [*HISTORY, {"role": "assistant", "content": "Three."}],
    },
    {"prompt": HISTORY, "chosen": [{"role": "assistant", "content": "1, 2, 3."}], "rejected": "3."},
]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def test_every_preference_shape_loads(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    prefs, counts = load_preferences(path)
    assert not counts and len(prefs) == len(RECORDS)
    assert prefs[0] == Preference(
        Example("Name a colour.", "", "Blue is a colour.", f"{path}:1"),
        Example("Name a colour.", "", "No.", f"{path}:1"),
        where=f"{path}:1",
    )
    assert prefs[1].chosen == Example("翻译成中文", "cat", "猫", f"{path}:2", "你是翻译。")
    assert prefs[2].start == 4 and prefs[2].chosen.messages == (
        *CHAT_PROMPT,
        ("assistant", "One, two, three."),
    )
    assert prefs[3].rejected.messages == (("user", "写一首诗。"), ("assistant", "不要。"))
    assert prefs[4].start == 4 and prefs[4].rejected.messages[-1] == ("assistant", "Three.")
    assert prompt_key(prefs[2]) == prompt_key(prefs[4]) == prompt_key(prefs[5])  # one prompt, one split
    mixed = {
        "instruction": "翻译",
        "input": "cat",
        "chosen": {"role": "assistant", "content": "猫"},
        "rejected": "狗",
    }
    (pref,) = to_preferences(mixed, "w")  # a text prompt with chat answers becomes one user turn
    assert pref.chosen == Chat((("user", "翻译\n\ncat"), ("assistant", "猫")), "w") and pref.start == 1
    train, valid = split_examples(prefs * 20, 0.3, seed=1, key=prompt_key)
    assert not {prompt_key(p) for p in train} & {prompt_key(p) for p in valid}


def test_bad_preference_records_are_counted(tmp_path):
    bad = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "a"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": " ", "rejected": "b"},
        {"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
        {"messages": HISTORY, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        {"messages": HISTORY, "chosen": {"role": "robot", "content": "a"}, "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "system": ["x"]},
        [1, 2],
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([json.dumps(RECORDS[0]), "{oops", *map(json.dumps, bad)]) + "\n")
    prefs, counts = load_preferences(path)
    assert len(prefs) == 1 and len(prefs) + sum(counts.values()) == 2 + len(bad)
    assert counts == {
        "bad_json": 1,
        "identical_answers": 1,
        "missing_chosen_or_rejected": 1,
        "missing_prompt": 1,
        "empty_answer": 1,
        "no_shared_prompt": 1,
        "answer_not_assistant": 1,
        "unknown_role": 1,
        "non_string_system": 1,
        "not_an_object": 1,
    }


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return load_preferences(write_jsonl(tmp_path_factory.mktemp("p") / "p.jsonl", RECORDS))[0]


def trained_text(tok, enc) -> str:
    return tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def test_only_the_answer_is_trained(ft_tok, prefs):  # noqa: F811
    pairs, counts = encode_preferences(ft_tok, prefs, 256, template="chat")
    assert not counts and len(pairs) == len(prefs)
    eos = ft_tok.eos_token
    # multi-turn prompt: the earlier assistant turn ("Hello!") is prompt, not trained
    assert trained_text(ft_tok, pairs[2].chosen) == f"One, two, three.{eos}"
    assert trained_text(ft_tok, pairs[2].rejected) == f"Four.{eos}"
    assert trained_text(ft_tok, pairs[3].chosen) == f"床前明月光，疑是地上霜。{eos}"
    assert pairs[2].chosen.input_ids[:20] == pairs[2].rejected.input_ids[:20]  # the shared prompt
    alpaca, _ = encode_preferences(ft_tok, prefs[:2], 256, template="alpaca")
    prompt = ft_tok.decode(alpaca[1].chosen.input_ids)
    assert prompt.startswith("<|bos|>你是翻译。\n\n### Instruction:\n翻译成中文") and prompt.endswith(
        f"猫{eos}"
    )
    assert trained_text(ft_tok, alpaca[1].chosen) == f"猫{eos}"
    assert (
        len({p.key for p in pairs}) == len(pairs) and pairs[0].key != alpaca[0].key
    )  # template changes tokens
    cut, counts = encode_preferences(ft_tok, prefs, 24, template="chat")
    assert counts["prompt_too_long"] + len(cut) == len(prefs) and counts["truncated"] >= 1


def with_reference(model, pairs, micro_size=2, seq_len=128):
    table = dpo.reference_logps(model, pairs, micro_size=micro_size, seq_len=seq_len, pad_id=0)
    return [replace(p, ref_chosen=float(c), ref_rejected=float(r)) for p, (c, r) in zip(pairs, table)]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_logps_and_metrics_equal_trl(ft_init, ft_tok, prefs, loss, tmp_path):  # noqa: F811
    """TRL's DPOTrainer._compute_loss on our batch (its completion_mask = our labels), with our
    reference log-probs as its precomputed ones; and TRL's reference log-probs against ours."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(ft_init, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(ft_init, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    pairs = with_reference(reference, encode_preferences(ft_tok, prefs, 128, template="chat")[0])
    batch = dpo.collate_pairs(pairs, 128, pad_id=0)
    cfg = DPOSection(beta=0.2, loss=loss)
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ours, stats = dpo.pair_loss_sum(logits, batch, cfg)
    metrics = dpo.preference_metrics(stats)

    args = DPOConfig(
        output_dir=str(tmp_path), beta=0.2, loss_type=[loss], bf16=False, use_cpu=True, report_to="none"
    )
    tiny = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # TRL wants one to start
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=tiny, processing_class=ft_tok
    )
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),
    }
    with torch.no_grad():
        trl_chosen, trl_rejected = trainer.compute_ref_log_probs(reference, inputs)
        trainer.precompute_ref_logps = True  # use ours as TRL's precomputed reference
        refs = {
            "ref_chosen_logps": batch["ref_chosen"].float(),
            "ref_rejected_logps": batch["ref_rejected"].float(),
        }
        trl_loss = trainer._compute_loss(trainer.model, {**inputs, **refs}, return_outputs=False)
    torch.testing.assert_close(batch["ref_chosen"].float(), trl_chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(batch["ref_rejected"].float(), trl_rejected, atol=1e-4, rtol=1e-5)
    assert float(ours) / len(pairs) == pytest.approx(float(trl_loss), abs=1e-5)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert metrics["reward_margin"] == pytest.approx(logged["rewards/margins"], abs=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(logged["rewards/accuracies"], abs=1e-6)
    assert metrics["reward_chosen"] == pytest.approx(logged["rewards/chosen"], abs=1e-5)
    assert metrics["logp_rejected"] == pytest.approx(logged["logps/rejected"], rel=1e-6)


# ---------------------------------------------------------------- tiny model: reference pass, file, training


def synthetic_pairs(n: int, seed: int) -> list[Pair]:
    """Prompt [BOS, mode, 5 random tokens, SEP]; answers of 6 tokens from 10-24 or 25-39: mode 4
    prefers the low ones, mode 5 the high ones (to learn it the model must read the prompt)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        mode = rng.choice([4, 5])
        prompt = [1, mode] + [rng.randrange(10, 40) for _ in range(5)] + [3]
        low, high = [rng.randrange(10, 25) for _ in range(6)], [rng.randrange(25, 40) for _ in range(6)]
        good, bad = (low, high) if mode == 4 else (high, low)
        masked = [IGNORE_INDEX] * len(prompt)
        c, r = (sft.Encoded(prompt + a + [2], masked + a + [2]) for a in (good, bad))
        out.append(Pair(c, r, pair_key(c, r)))
    return out


def test_reference_pass_sharded_like_the_loop_equals_one_rank():
    model, pairs = tiny_llama(vocab_size=48), synthetic_pairs(7, seed=3)
    whole = dpo.reference_logps(model, pairs, micro_size=2, seq_len=16, pad_id=0)
    shares = [
        dpo.reference_logps(model, pairs, micro_size=2, seq_len=16, pad_id=0, dp_rank=r, dp_size=2)
        for r in range(2)
    ]
    assert all((s != 0).any(dim=1).sum() < len(pairs) for s in shares)  # each rank did only part
    torch.testing.assert_close(shares[0] + shares[1], whole)
    assert whole.dtype == torch.float64 and bool((whole < 0).all())
    assert model.training  # mode restored


def test_reference_file_is_deterministic_checked_and_reused(tmp_path):
    model, pairs = tiny_llama(vocab_size=48), synthetic_pairs(6, seed=4)
    pairs = pairs + pairs[:2]  # duplicates share a key and a row
    meta = {"init": "sha256:abc", "seq_len": "16"}
    batching = dict(micro_size=4, seq_len=16, pad_id=0)
    path = tmp_path / "run" / dpo.REFERENCE_NAME
    got = dpo.ensure_reference(model, pairs, path, meta, **batching)
    first = path.read_bytes()
    again = dpo.ensure_reference(torch.nn.Linear(1, 1), pairs, path, meta, **batching)  # loads, no forward
    assert again == got and all(p.ref_chosen is not None for p in got)
    table = dpo.reference_logps(model, pairs, **batching)
    dpo.save_reference(tmp_path / "b.pt", list(reversed(pairs)), table.flip(0), meta)
    assert (tmp_path / "b.pt").read_bytes() == first  # order-free, same bytes
    obj = torch.load(path, weights_only=True)
    assert len(obj["keys"]) == 6 and obj["logps"].shape == (6, 2)
    with pytest.raises(CheckpointError, match="computed for init='sha256:abc', this run has 'sha256:other'"):
        dpo.load_reference(path, {**meta, "init": "sha256:other"})
    with pytest.raises(CheckpointError, match="no reference log-probs for 3 of 3 pairs"):
        dpo.attach_reference(synthetic_pairs(3, seed=9), dpo.load_reference(path, meta), path)
    path.write_bytes(first[:100])
    with pytest.raises(CheckpointError, match="cannot read reference log-probs"):
        dpo.load_reference(path, meta)


def test_padding_pair_adds_nothing():
    model = tiny_llama(vocab_size=48)
    pairs = with_reference(model, synthetic_pairs(1, seed=5), seq_len=16)
    empty = dpo.collate_pairs([], 16, pad_id=0)
    assert empty["input_ids"].shape == (2, 16) and dpo.pair_count(empty) == 0
    with torch.no_grad():
        loss, stats = dpo.pair_loss_sum(model(input_ids=empty["input_ids"]).logits, empty, DPOSection())
    assert float(loss) == 0.0 and not stats.any()
    with pytest.raises(CheckpointError, match="without reference log-probs"):
        dpo.pair_loss_sum(
            torch.zeros(2, 16, 48),
            dpo.collate_pairs([replace(pairs[0], ref_chosen=None)], 16, 0),
            DPOSection(),
        )


def test_dpo_raises_the_held_out_margin():
    """Reference = the starting model, so the margin starts at exactly 0; a few AdamW steps on 128
    pairs must make held-out pairs (new prompts, new answers) prefer the chosen answer."""
    model, cfg = tiny_llama(vocab_size=48), DPOSection(beta=0.1)
    train = with_reference(model, synthetic_pairs(128, seed=0), micro_size=64, seq_len=16)
    held = dpo.collate_pairs(
        with_reference(model, synthetic_pairs(32, seed=1), micro_size=32, seq_len=16), 16, 0
    )

    def held_out() -> dict[str, float]:
        with torch.no_grad():
            logits = model(input_ids=held["input_ids"], attention_mask=held["attention_mask"]).logits
        return dpo.preference_metrics(dpo.pair_loss_sum(logits, held, cfg)[1])

    assert held_out()["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    for step in range(8):  # one pass over the 128 pairs
        batch = dpo.collate_pairs([train[i] for i in order[step * 16 : (step + 1) * 16]], 16, 0)
        loss, _ = dpo.pair_loss_sum(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch, cfg
        )
        (loss / dpo.pair_count(batch)).backward()
        opt.step()
        opt.zero_grad()
    after = held_out()
    assert after["reward_margin"] > 0.3 and after["reward_accuracy"] >= 0.9, after
