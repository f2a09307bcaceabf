"""Tokenizer training (real SentencePiece) and its Hugging Face copy (real transformers): same ids, offline."""

from __future__ import annotations

import bz2
import gzip
import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm

from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError
from pipeline.io import read_jsonl_zst, sha256_file, write_jsonl_zst
from pipeline.tokenizer.config import SPECIAL_IDS, TokenizerConfig
from pipeline.tokenizer.hf import fingerprint, load_tokenizer
from pipeline.tokenizer.train import choose_shards, resolve_inputs, sample_documents, train_tokenizer

SAMPLE = Path(__file__).resolve().parent / "data" / "sample" / "instructions.jsonl"
ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
EDGE_TEXTS = [
    "",
    " ",
    "  two leading spaces",
    "trailing  ",
    "a\tb\n\nc\r\nd",
    "12345 3.14159 1,000,000",
    "emoji 🤖🎉 done",
    "NBSP\u00a0x\u3000y",
    "e\u0301 combining",
    "数学是研究数量、结构的学科。",
    "Привет, мир",
    "<|user|>hello",
    "hi <|assistant|> there<|system|>",
    "<0x41> is not a byte",
    "\x00nul",
    "\n",
]


def write_corpus(folder: Path, n: int | None = None) -> Path:
    """The shipped instruction sample as one cleaned shard of Document rows."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()][:n]
    docs = [
        {
            "id": f"instr/{i}",
            "text": "\n".join(filter(None, (r["instruction"], r["input"], r["output"]))),
            "source": "test",
            "meta": {},
        }
        for i, r in enumerate(rows)
    ]
    write_jsonl_zst(folder / "sample.jsonl.zst", docs)
    return folder


def tiny_config(tmp: Path, **kw) -> TokenizerConfig:
    kw = {
        "name": "tiny",
        "inputs": [str(write_corpus(tmp / "cleaned"))],
        "output_root": tmp / "tok",
        "vocab_size": 500,
        **kw,
    }
    return TokenizerConfig(**kw)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> Path:
    return train_tokenizer(tiny_config(tmp_path_factory.mktemp("tiny")))


def test_folder_layout_and_special_ids(tiny_tok):
    names = {p.name for p in tiny_tok.iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "training.json"} <= names
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tok / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == tuple(SPECIAL_IDS.values()) == (0, 1, 2, 3)
    assert [sp.piece_to_id(r) for r in ROLES] == [4, 5, 6]
    assert sp.get_piece_size() == 500
    assert fingerprint(tiny_tok) == sha256_file(tiny_tok / "tokenizer.model")
    info = json.loads((tiny_tok / "training.json").read_text())
    assert info["fingerprint"] == fingerprint(tiny_tok) and info["sample"]["documents"] == 1358


def test_hf_matches_sentencepiece_on_edge_texts(tiny_tok):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tok / "tokenizer.model"))
    hf = load_tokenizer(tiny_tok)
    for text in EDGE_TEXTS:
        ids = sp.encode(text)
        assert hf.encode(text) == ids == hf(text)["input_ids"], text  # no BOS/EOS added by default
        assert hf.decode(ids) == sp.decode(ids) == text  # lossless: no normalization, spaces kept
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert len(hf) == sp.get_piece_size()


def test_documented_difference_literal_control_strings(tiny_tok):
    """HF matches the literal text of the bos/eos pieces as those tokens; SentencePiece never does."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tok / "tokenizer.model"))
    hf = load_tokenizer(tiny_tok)
    assert 2 in hf.encode("end<|eos|>") and 2 not in sp.encode("end<|eos|>")


def test_chat_template_uses_role_tokens(tiny_tok):
    hf = load_tokenizer(tiny_tok)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = hf.apply_chat_template(chat, tokenize=False)
    assert text == "<|bos|><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!<|eos|>\n"
    ids = hf.encode(text)
    assert ids[:2] == [1, 4] and 5 in ids and 6 in ids and 2 in ids
    prompt = hf.apply_chat_template(chat[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    assert hf.decode(ids, skip_special_tokens=True) == "\nBe brief.\n\nHi\n\nHello!\n"


def test_training_is_deterministic(tmp_path, tiny_tok):
    again = train_tokenizer(tiny_config(tmp_path))
    for name in ("tokenizer.model", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_tok / name).read_bytes()


def test_digits_are_split_and_unknown_characters_fall_back_to_bytes(tiny_tok):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tok / "tokenizer.model"))
    pieces = [sp.id_to_piece(i) for i in sp.encode("In 2023, 1,000 paid 3.14")]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("20231000314")  # every digit its own piece
    ids = sp.encode("ψ→🤖")  # not in the instruction sample: spelled as UTF-8 bytes, never <unk>
    assert 0 not in ids and all(sp.id_to_piece(i).startswith("<0x") for i in ids)
    assert len(ids) == len("ψ→🤖".encode()) and sp.decode(ids) == "ψ→🤖"


def test_sentencepiece_logging_is_silenced(tmp_path, capfd):
    train_tokenizer(tiny_config(tmp_path, sample_docs=200))
    out, err = capfd.readouterr()
    # SentencePiece's C++ trainer logs as "<file>.cc(<line>) LOG(INFO) ..."; other libraries' warnings
    # (written by earlier tests' threads) may share stderr, so look for its lines only.
    noise = [line for line in (err + out).splitlines() if ".cc(" in line or "LOG(INFO)" in line]
    assert noise == [], noise[:5]


def test_sample_is_seeded_and_independent_of_file_order(tmp_path):
    folder = write_corpus(tmp_path / "a")
    rows = list(read_jsonl_zst(folder / "sample.jsonl.zst"))
    write_jsonl_zst(tmp_path / "b" / "0.jsonl.zst", rows[700:])  # same documents, other file order
    write_jsonl_zst(tmp_path / "b" / "1.jsonl.zst", rows[:700])
    cfg = tiny_config(tmp_path, sample_docs=50)
    one = sample_documents(resolve_inputs([str(folder)]), cfg)
    two = sample_documents(resolve_inputs([str(tmp_path / "b" / "*.jsonl.zst")]), cfg)
    assert one.lines == two.lines and one.documents == 50 and one.seen == 1358
    other_seed = sample_documents(
        resolve_inputs([str(folder)]), tiny_config(tmp_path, sample_docs=50, seed=1)
    )
    assert other_seed.lines != one.lines
    capped = sample_documents(resolve_inputs([str(folder)]), tiny_config(tmp_path, max_chars=1000))
    assert 0 < capped.chars <= 1000


def test_max_shards_reads_a_seeded_subset_of_files(tmp_path):
    paths = [Path(f"c/part-{k}.jsonl.zst") for k in range(10)]
    three = choose_shards(paths, tiny_config(tmp_path, max_shards=3))
    assert len(three) == 3 and three == sorted(three) and set(three) < set(paths)
    assert choose_shards(paths[::-1], tiny_config(tmp_path, max_shards=3)) == three  # order-independent
    assert choose_shards(paths, tiny_config(tmp_path, max_shards=3, seed=9)) != three
    assert choose_shards(paths, tiny_config(tmp_path)) == paths  # 0: all


def test_bad_records_are_counted_not_fatal(tmp_path):
    write_corpus(tmp_path / "c", n=200)
    write_jsonl_zst(
        tmp_path / "c" / "bad.jsonl.zst", [{"id": "x"}, {"id": "y", "text": 3}, {"text": "no id here"}]
    )
    sample = sample_documents(resolve_inputs([str(tmp_path / "c")]), tiny_config(tmp_path))
    assert sample.bad == {"no_text": 2} and sample.seen == 201


def test_unigram_trains_and_loads(tmp_path):
    out = train_tokenizer(tiny_config(tmp_path, model_type="unigram", name="uni"))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    hf = load_tokenizer(out)
    for text in ["Return the value.", "<|user|>hello", "emoji 🤖"]:
        assert hf.encode(text) == sp.encode(text)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("vocab_size=100", "vocab_size"),
        ("name=a/b", "name"),
        ("character_coverage=0.5", "character_coverage"),
        ("special_tokens=[x, x]", "special_tokens[1]"),
        ("special_tokens=['<|eos|>']", "special_tokens[0]"),
        ("model_type=wordpiece", "model_type"),
        ("max_shards=-1", "max_shards"),
    ],
)
def test_config_errors_name_the_key(tmp_path, override, key):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("name: t\ninputs: [x]\n")
    with pytest.raises(ConfigError) as err:
        load_config(TokenizerConfig, cfg, [override])
    assert err.value.key == key


def test_user_errors(tmp_path):
    folder = write_corpus(tmp_path / "cut", n=300)
    data = (folder / "sample.jsonl.zst").read_bytes()
    (folder / "sample.jsonl.zst").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="sample.jsonl.zst: unreadable: truncated zstd"):
        train_tokenizer(tiny_config(tmp_path, inputs=[str(folder)]))
    with pytest.raises(ConfigError, match="matches no cleaned shard"):
        train_tokenizer(TokenizerConfig(name="t", inputs=[str(tmp_path / "nothing*.jsonl.zst")]))
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="not found"):
        fingerprint(tmp_path)


def test_shipped_config_loads():
    cfg = load_config(
        TokenizerConfig, Path(__file__).resolve().parents[1] / "configs/tokenizer/wiki_sample.yaml"
    )
    assert cfg.name == "wiki_sample" and cfg.special_tokens == ROLES


# ------------------------------------------------------------------ real samples


def real_texts(raw: Path, limit: int = 5000) -> list[str]:
    """English and multilingual web text (C4, Dolma, RedPajama, CCNet, OSCAR), Chinese SFT text and raw
    wikitext (zhwiki, enwiki, ltgwiki) from ../shared/data/raw, cut to `limit` characters each."""
    import zstandard

    texts = [json.loads(line)["text"] for line in (raw / "web/c4-en-sample.jsonl").open(encoding="utf-8")][
        :150
    ]
    with gzip.open(raw / "web/CC-MAIN-20190717121559-20190717143559-00140.dolma.jsonl.gz", "rt") as fh:
        texts += [json.loads(line)["text"] for line in fh][:150]
    with (raw / "web/oscar-2201-multilingual-sample.jsonl.zst").open("rb") as fh:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
        texts += [json.loads(line)["content"] for line in lines]
    for name in ("redpajama-cc-2023-06-sample.jsonl",):
        texts += [json.loads(line)["text"] for line in (raw / "web" / name).open(encoding="utf-8")][:100]
    with gzip.open(raw / "web/ccnet-cc_en_head-0091.jsonl.gz", "rt", encoding="utf-8") as fh:
        texts += [json.loads(line)["text"] for line in fh][:50]
    zh = json.loads((raw / "sft/alpaca_zh_demo.json").read_text(encoding="utf-8"))[:150]
    texts += [f"{x['instruction']}\n{x['input']}\n{x['output']}" for x in zh]
    wiki = (raw / "wiki/zhwiki-test-pages.xml").read_text(encoding="utf-8")[:100_000]
    with bz2.open(raw / "wiki/enwiki-table-markup.xml.bz2", "rt", encoding="utf-8") as fh:
        wiki += fh.read()[:100_000]
    with bz2.open(raw / "wiki/ltgwiki-pages-articles.xml.bz2", "rt", encoding="utf-8") as fh:
        wiki += fh.read()[:100_000]
    texts += [wiki[i : i + limit] for i in range(0, len(wiki), limit)]
    return [t[:limit] for t in texts]


def test_hf_matches_sentencepiece_on_real_samples(tmp_path, raw_samples):
    texts = real_texts(raw_samples)
    docs = [{"id": f"r/{i}", "text": t} for i, t in enumerate(texts) if i % 2 == 0]  # train on half
    write_jsonl_zst(tmp_path / "c" / "real.jsonl.zst", docs)
    out = train_tokenizer(
        TokenizerConfig(
            name="real",
            inputs=[str(tmp_path / "c")],
            output_root=tmp_path / "tok",
            vocab_size=3000,
            character_coverage=0.995,
        )
    )
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    hf = load_tokenizer(out)
    sp_ids = sp.encode(texts)
    hf_ids = hf(texts)["input_ids"]
    diffs = [t[:60] for t, a, b in zip(texts, sp_ids, hf_ids) if a != b]
    assert not diffs, f"{len(diffs)} of {len(texts)} texts differ, e.g. {diffs[:3]}"
    assert sum(map(len, sp_ids)) > 100_000
    assert any(sp.id_to_piece(i).startswith("<0x") for ids in sp_ids for i in ids)  # byte fallback exercised
