"""PretrainConfig loading and resolve(): batch arithmetic, vocab from the manifest, errors naming keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dist_helpers import write_token_dir

from pipeline.config import load_config, save_config
from pipeline.errors import ConfigError, DataError
from pipeline.runtime.engine import precision_supported
from pipeline.train.config import PretrainConfig, ResolvedPretrainConfig, load_model_config, resolve

REPO = Path(__file__).resolve().parents[1]
TINY_CPU = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"


@pytest.fixture
def tokens(tmp_path) -> Path:
    docs = [np.arange(1, 50) % 90 + 4 for _ in range(4)]
    return write_token_dir(tmp_path / "tokens", {"train": [docs], "valid": [docs[:1]]}, vocab_size=96)


def load(tokens: Path, *overrides: str) -> PretrainConfig:
    base = [f"data.tokens={tokens}", f"model.file={REPO / 'configs/model/tiny.yaml'}"]
    return load_config(PretrainConfig, TINY_CPU, [*base, *overrides])


def test_tiny_cpu_resolves_on_two_ranks(tokens):
    r = resolve(load(tokens), world_size=2)
    assert (r.derived.dp_size, r.derived.grad_accum) == (2, 2)
    assert r.model.vocab_size == 96 and r.model.num_layers == 2
    assert r.derived.tokens_per_step == 8 * 128 and r.derived.num_params > 0
    assert (r.derived.bos_id, r.derived.eos_id, r.derived.pad_id) == (2, 3, 0)
    assert resolve(load(tokens), world_size=1).derived.grad_accum == 4


def test_resolved_config_round_trips(tokens, tmp_path):
    r = resolve(load(tokens), world_size=2)
    save_config(r, tmp_path / "config.yaml")
    back = load_config(ResolvedPretrainConfig, tmp_path / "config.yaml")
    assert back == r


def test_indivisible_global_batch(tokens):
    with pytest.raises(ConfigError) as err:
        resolve(load(tokens, "batch.global_size=10"), world_size=2)
    assert err.value.key == "batch.global_size"
    assert "(2 x 2 = 4), got 10" in str(err.value)


def test_vocab_mismatch_names_the_key(tokens):
    with pytest.raises(ConfigError) as err:
        resolve(load(tokens, "model.overrides.vocab_size=1000"), world_size=1)
    assert err.value.key == "model.overrides.vocab_size" and "96" in err.value.msg
    assert err.value.file == "command line 'model.overrides.vocab_size=1000'"


def test_model_overrides_are_checked(tokens):
    cfg = load(tokens, "model.overrides.hidden_size=32", "model.overrides.tie_embeddings=false")
    model = load_model_config(cfg.model)
    assert model.hidden_size == 32 and model.tie_embeddings is False
    with pytest.raises(ConfigError) as err:
        load_model_config(load(tokens, "model.overrides.hidden_sise=32").model)
    assert err.value.key == "model.overrides.hidden_sise" and "hidden_size" in err.value.msg
    assert err.value.file == "command line 'model.overrides.hidden_sise=32'"  # not configs/model/tiny.yaml


def test_a_model_override_typo_in_the_run_config_is_blamed_on_that_file(tokens, tmp_path):
    """The typo sits in the pretraining YAML's model.overrides, not in configs/model/*.yaml; a rule
    broken by a value of the model file names the model file."""
    run = tmp_path / "run.yaml"
    run.write_text(f"model:\n  file: {REPO / 'configs/model/tiny.yaml'}\n  overrides: {{num_layer: 4}}\n")
    with pytest.raises(ConfigError) as err:
        resolve(load_config(PretrainConfig, run, [f"data.tokens={tokens}"]), world_size=1)
    assert str(err.value).startswith(f"{run}: model.overrides.num_layer: unknown key (did you mean")
    with pytest.raises(ConfigError) as err:  # tie_embeddings: true comes from the model file
        resolve(load(tokens, "parallel.tp_size=2", "parallel.zero_stage=1"), world_size=2)
    assert err.value.key == "model.tie_embeddings" and err.value.file == str(REPO / "configs/model/tiny.yaml")
    with pytest.raises(ConfigError) as err:
        load_model_config(load(tokens, "model.overrides.num_heads=3").model)
    assert err.value.key == "model.overrides.num_heads"


def test_seq_len_longer_than_model(tokens):
    with pytest.raises(ConfigError) as err:
        resolve(load(tokens, "data.seq_len=1024"), world_size=1)
    assert err.value.key == "data.seq_len"


def test_eval_tasks_are_checked_before_training(tokens, tmp_path):
    r = resolve(load(tokens, "train.eval_tasks=[gristmill_cloze]", "train.eval_tasks_every=5"), world_size=1)
    assert r.train.eval_tasks == ["gristmill_cloze"] and r.train.eval_tasks_every == 5
    with pytest.raises(ConfigError, match=r"train.eval_tasks\[1\]: unknown task 'nope'"):
        resolve(load(tokens, "train.eval_tasks=[gristmill_ppl,nope]"), world_size=1)
    (tmp_path / "hub.yaml").write_text("task: hub\ndataset_path: some/hub-dataset\n")
    with pytest.raises(
        ConfigError, match=r"eval_tasks\[0\]: .*hub.yaml: dataset_path: must be a local builder"
    ):
        resolve(load(tokens, f"train.eval_tasks=[{tmp_path / 'hub.yaml'}]"), world_size=1)
    with pytest.raises(ConfigError, match="train.eval_tasks_limit: must be >= 1"):
        load(tokens, "train.eval_tasks_limit=0")


def test_tp_must_divide_world(tokens):
    tp = ("parallel.tp_size=2", "parallel.zero_stage=1", "model.overrides.tie_embeddings=false")
    with pytest.raises(ConfigError) as err:
        resolve(load(tokens, *tp), world_size=3)
    assert err.value.key == "parallel.tp_size" and "divide the world size (3)" in err.value.msg
    r = resolve(load(tokens, *tp), world_size=4)
    assert (r.derived.dp_size, r.derived.grad_accum) == (2, 2)


def test_autotp_needs_untied_embeddings(tokens):
    with pytest.raises(ConfigError) as err:
        resolve(load(tokens, "parallel.tp_size=2", "parallel.zero_stage=1"), world_size=4)
    assert err.value.key == "model.tie_embeddings" and "tie_embeddings: false" in err.value.msg


def test_autotp_with_zero3_is_refused_at_load(tokens):
    with pytest.raises(ConfigError) as err:
        load(tokens, "parallel.tp_size=2")  # tiny_cpu is ZeRO-3
    assert err.value.key == "parallel.tp_size" and "zero_stage 0, 1 or 2" in err.value.msg


def test_model_size_configs(tokens):
    from pipeline.model.flops import num_params

    expect = {
        "llama_125m": (0.09e9, 0.13e9),
        "llama_350m": (0.3e9, 0.36e9),
        "llama_1b3": (1.1e9, 1.35e9),
        "llama_7b": (6.5e9, 7.5e9),
    }
    for name, (lo, hi) in expect.items():
        model = load_model_config(load(tokens, f"model.file={REPO / 'configs/model' / name}.yaml").model)
        model.vocab_size = 32000
        assert lo < num_params(model) < hi, name
        assert model.kv_heads < model.num_heads  # GQA


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest.json"):
        resolve(load(tmp_path / "nowhere"), world_size=1)


def test_section_validation_names_key(tokens):
    with pytest.raises(ConfigError) as err:
        load(tokens, "optim.min_lr=1.0")
    assert err.value.key == "optim.min_lr"
    with pytest.raises(ConfigError) as err:
        load(tokens, "parallel.precision=fp8")
    assert err.value.key == "parallel.precision"


@pytest.mark.skipif(precision_supported("fp16"), reason="this CPU's DeepSpeed accelerator supports fp16")
def test_fp16_refused_with_a_hint(tokens):
    with pytest.raises(ConfigError) as err:
        resolve(load(tokens, "parallel.precision=fp16"), world_size=1)
    assert err.value.key == "parallel.precision" and "bf16" in err.value.msg


def test_blend_mixes_folders_by_weight_and_checks_the_tokenizer(tokens, tmp_path):
    from pipeline.train.trainer import open_loaders

    web_docs = [np.full(49, 7) for _ in range(4)]
    web = write_token_dir(tmp_path / "web", {"train": [web_docs], "valid": [web_docs[:1]]}, vocab_size=96)
    blend = f"data.blend=[{{tokens: {tokens}, weight: 1}}, {{tokens: {web}, weight: 3}}]"
    train, valid = open_loaders(resolve(load(tokens, blend, "data.seq_len=8"), world_size=1))
    rows = np.concatenate(
        [b["input_ids"].numpy() for s in range(0, 400, 8) for b in train.micro_batches(s, 8, 8, 0, 1)]
    )
    web_share = float(np.mean((rows == 7).all(axis=1)))
    assert abs(web_share - 0.75) < 0.02 and valid is not None
    with pytest.raises(ConfigError, match=r"data.blend\[1\].weight: must be > 0"):
        load(tokens, f"data.blend=[{{tokens: {tokens}}}, {{tokens: {web}, weight: 0}}]")


def test_launcher_turns_a_config_error_into_one_line(tokens, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_pretrain", REPO / "launch" / "pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = [
        "--config",
        str(TINY_CPU),
        f"data.tokens={tokens}",
        f"model.file={REPO / 'configs/model/tiny.yaml'}",
    ]
    with pytest.raises(SystemExit) as exc:  # a world-size rule names the file the batch came from
        mod.main([*args, "--check", "--world-size", "8"])
    assert str(exc.value.code).startswith(f"error: {TINY_CPU}: batch.global_size: must be divisible")
    tp = ["parallel.tp_size=2", "parallel.zero_stage=1", "model.overrides.tie_embeddings=false"]
    with pytest.raises(SystemExit) as exc:  # ... or the override that set the key
        mod.main([*args, "--check", "--world-size", "3", *tp])
    assert str(exc.value.code).startswith(
        "error: command line 'parallel.tp_size=2': parallel.tp_size: must divide the world size (3)"
    )
    with pytest.raises(SystemExit) as exc:
        mod.main([*args, "--check", "optim.lr_max=1"])
    assert str(exc.value.code).startswith("error: command line 'optim.lr_max=1': optim.lr_max: unknown key")


def test_the_pretraining_job_builds_its_model_in_the_training_dtype(tokens, tmp_path, monkeypatch):
    """Issue 18: ZeRO 0-2 and AutoTP built the fp32 model in host memory on every rank; the job's model
    comes out in bf16 now (the engine builds it on the rank's device), and its checksums are recorded."""
    import torch

    from pipeline.train.trainer import CHECKSUM_RECORD, prepare

    monkeypatch.delenv("RANK", raising=False)
    cfg = load(tokens, f"run.dir={tmp_path / 'runs'}", "parallel.zero_stage=1", "parallel.precision=bf16")
    job = prepare(cfg)
    assert {p.dtype for p in job.model_fn().parameters()} == {torch.bfloat16}
    assert (job.run_dir / CHECKSUM_RECORD).is_file()
