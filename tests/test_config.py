"""Config loading (pipeline/config.py) through DataConfig: every user error names the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import config_hash, load_config, save_config
from pipeline.data.config import DataConfig
from pipeline.errors import ConfigError

BASE = "inputs: [a.xml.bz2]\noutput_dir: out/x\nsteps: [clean]\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(DataConfig, path, overrides)
    return str(exc.value)


def test_valid_file_with_overrides(tmp_path):
    cfg = load_config(DataConfig, write(tmp_path, BASE), ["clean.min_chars=50", "ray.num_cpus=3"])
    assert cfg.clean.min_chars == 50 and cfg.ray.num_cpus == 3 and cfg.output_dir == Path("out/x")
    assert cfg.ray.address is None and cfg.tokenize.valid_fraction == 0.01


def test_unknown_key_suggests_the_near_one(tmp_path):
    msg = error_of(tmp_path, BASE + "clean:\n  min_char: 10\n")
    assert msg == f"{tmp_path / 'data.yaml'}: clean.min_char: unknown key (did you mean 'clean.min_chars'?)"


def test_unknown_key_without_a_near_one_lists_the_known(tmp_path):
    msg = error_of(tmp_path, BASE + "ray:\n  zzz: 1\n")
    assert (
        "ray.zzz: unknown key (known: address, num_cpus, object_store_memory, spill_dir, max_retries)" in msg
    )


def test_wrong_type_names_key_and_value(tmp_path):
    msg = error_of(tmp_path, BASE + "clean:\n  min_chars: lots\n")
    assert msg.endswith("clean.min_chars: must be int, got str 'lots'") and "data.yaml" in msg


def test_literal_and_list_types(tmp_path):
    formats = "wikipedia, warc, wet, jsonl, parquet, hf_disk"  # pipeline.data.formats.FORMATS
    assert f"format: must be auto or one of {formats}, got 'html'" in error_of(
        tmp_path, BASE + "format: html\n"
    )
    assert "steps[0]: must be one of ['clean', 'dedup', 'select', 'tokenize'], got 'shuffle'" in error_of(
        tmp_path, BASE.replace("[clean]", "[shuffle]")
    )
    assert "inputs: must be a list, got str" in error_of(tmp_path, BASE.replace("[a.xml.bz2]", "a.xml.bz2"))


def test_required_key(tmp_path):
    assert error_of(tmp_path, "output_dir: out\n").endswith("inputs: is required")


def test_bad_overrides(tmp_path):
    assert "clean.min_chars: override must look like key.sub=value" in error_of(
        tmp_path, BASE, ("clean.min_chars",)
    )
    assert "output_dir: is a value, not a section" in error_of(tmp_path, BASE, ("output_dir.sub=1",))
    assert "name: must be str, got dict" in error_of(tmp_path, BASE, ("name.sub=1",))
    assert "clean.min_chars: must be int, got str 'x'" in error_of(tmp_path, BASE, ("clean.min_chars=x",))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere/data.yaml"):
        load_config(DataConfig, "nowhere/data.yaml")


def test_invalid_yaml_gives_the_line(tmp_path):
    msg = error_of(tmp_path, "inputs: [a.xml\noutput_dir: out\nname: [x\n")
    assert "data.yaml: not valid YAML (line" in msg


def test_validate_errors_carry_the_section_path(tmp_path):
    assert "clean.min_chars: must be >= 0, got -1" in error_of(tmp_path, BASE, ("clean.min_chars=-1",))
    assert "tokenize.valid_fraction: must be in [0, 1), got 1.5" in error_of(
        tmp_path, BASE, ("tokenize.valid_fraction=1.5",)
    )
    assert "ray.num_cpus: must be >= 1" in error_of(tmp_path, BASE, ("ray.num_cpus=0",))
    assert (
        "steps: must be in the order ['clean', 'dedup', 'select', 'tokenize'], got ['tokenize', 'clean']"
        in error_of(tmp_path, BASE, ("steps=[tokenize,clean]",))
    )


def test_tokenize_step_needs_a_tokenizer(tmp_path):
    msg = error_of(tmp_path, BASE.replace("[clean]", "[clean, tokenize]"))
    assert "tokenize.tokenizer: is required when steps include 'tokenize'" in msg
    assert "python launch/train_tokenizer.py --config configs/tokenizer/wiki_sample.yaml" in msg


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(DataConfig, write(tmp_path, BASE), ["tokenize.tokenizer=tok/x"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(DataConfig, tmp_path / "resolved.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(
        load_config(DataConfig, tmp_path / "resolved.yaml", ["clean.min_chars=1"])
    ) != config_hash(cfg)


def test_an_error_names_the_override_that_set_the_key(tmp_path):
    path = write(tmp_path, BASE + "clean:\n  min_chars: 10\n")
    with pytest.raises(ConfigError) as exc:
        load_config(DataConfig, path, ["clean.min_chars=-1"])
    assert str(exc.value) == "command line 'clean.min_chars=-1': clean.min_chars: must be >= 0, got -1"
    with pytest.raises(ConfigError) as exc:  # a whole section set on the command line
        load_config(DataConfig, path, ["clean={min_chars: lots}"])
    assert str(exc.value).startswith("command line 'clean={min_chars: lots}': clean.min_chars: must be int")
    with pytest.raises(ConfigError) as exc:
        load_config(DataConfig, path, ["clean.min_chars"])
    assert str(exc.value).startswith("command line 'clean.min_chars': ")
    with pytest.raises(ConfigError) as exc:  # a section only the override made
        load_config(DataConfig, path, ["ray.extra.workers=2"])
    assert str(exc.value).startswith("command line 'ray.extra.workers=2': ray.extra: unknown key")


def test_errors_found_after_loading_name_where_the_key_was_set(tmp_path):
    """located(cfg): a rule checked later (world size, another section) still points at the file or
    the override; origin() answers for nested sections and list items."""
    from pipeline.config import located, origin
    from pipeline.train.config import PretrainConfig

    path = tmp_path / "pretrain.yaml"
    path.write_text("batch:\n  global_size: 12\ndata:\n  blend: [{tokens: a}, {tokens: b, weight: 2}]\n")
    cfg = load_config(PretrainConfig, path, ["batch.micro_size=4", "optim={lr: 0.01}"])
    assert origin(cfg, "batch.global_size") == str(path)
    assert origin(cfg.batch, "micro_size") == "command line 'batch.micro_size=4'"
    assert origin(cfg.optim, "lr") == origin(cfg, "optim.min_lr") == "command line 'optim={lr: 0.01}'"
    assert origin(cfg.data.blend[1], "weight") == str(path)
    assert origin(cfg.data.blend[0], "weight") == str(path)  # not set anywhere: its file is where to set it
    for key, where in (("batch.global_size", str(path)), ("batch.micro_size", "command line")):
        with pytest.raises(ConfigError) as exc, located(cfg):
            raise ConfigError(key, "must be divisible by micro_size x data-parallel size")
        assert str(exc.value).startswith(f"{where}") and f": {key}: must be divisible" in str(exc.value)
    with pytest.raises(ConfigError) as exc, located(cfg):  # an error that knows its file keeps it
        raise ConfigError("vocab_size", "differs", "configs/model/tiny.yaml")
    assert str(exc.value) == "configs/model/tiny.yaml: vocab_size: differs"
