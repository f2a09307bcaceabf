"""The Hugging Face side of a tokenizer folder: files written from `tokenizer.model`, loading, fingerprint.

`write_hf_files` builds a `tokenizers` pipeline that reproduces SentencePiece exactly for the
models train.py makes (identity normalization, no dummy prefix, whitespace kept, byte fallback):
no normalizer, spaces become "▁", then the same BPE merges (ranked like SentencePiece's piece
scores) or the same unigram scores. `AutoTokenizer.from_pretrained(dir)` then gives the ids of
`SentencePieceProcessor.encode` on any text, with no BOS/EOS added (add them explicitly, as the
token shards and fine-tuning do). Checked on ~550 real wiki/web/Chinese texts in tests/test_tokenizer.py
and, once, on 2,218 such texts (4.3 M tokens) with a 4,000-piece model: no difference.
Known differences, all narrow:
- HF matches the literal strings of the unk/bos/eos/pad pieces (`<unk>`, `<|bos|>`, `<|eos|>`, `<|pad|>`)
  in text as those tokens (so chat templates can write them); SentencePiece never does. The chat
  roles (`<|user|>`, ...) are user-defined pieces: both match them as whole tokens.
- unigram models only: HF's Viterbi occasionally picks another segmentation of a word than
  SentencePiece (15 of 2,218 real texts differed at one spot, e.g. "lete" as le|t|e vs l|et|e).
  bpe models (the default) matched on all of them.
- Decoding (both): a literal "▁" in the text comes back as a space; everything else round-trips.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DataError
from pipeline.io import sha256_file

MODEL_FILE = "tokenizer.model"
SPACE = "\u2581"  # "▁", SentencePiece's escaped space
# piece types in sentencepiece_model.proto
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
OFF_PATH = -1e6  # unigram score of non-normal pieces: never chosen over ordinary pieces

# Renders {"role", "content"} messages with the role tokens; roles other than these three are an error.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{%- endif %}"
    "{{ '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}"
)


def read_proto(model_file: Path):
    """The parsed SentencePiece ModelProto of `model_file`."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as exc:  # protobuf raises DecodeError; the message alone says little
        raise DataError(f"{model_file}: not a SentencePiece model ({exc})") from None
    return proto


def _check_supported(proto, model_file: Path) -> None:
    norm = proto.normalizer_spec
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        raise DataError(
            f"{model_file}: only identity-normalized models without dummy prefix or whitespace removal "
            f"convert exactly (got {norm.name}, add_dummy_prefix={norm.add_dummy_prefix}, "
            f"remove_extra_whitespaces={norm.remove_extra_whitespaces}); train it with pipeline.tokenizer.train"
        )


def bpe_merges(pieces: list[str], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every (left, right) split of a piece into two pieces, ranked by the merged piece's id.

    SentencePiece's BPE encoder repeatedly merges the adjacent pair whose concatenation is the
    best-scored piece; BPE piece scores fall with the id, so ranking by id is the same order.
    """
    ids = {p: i for i, p in enumerate(pieces) if p in mergeable}
    merges = []
    for piece, i in ids.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in ids and b in ids]
        merges.extend((i, ids[a], ids[b], a, b) for a, b in splits)
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def build_backend(proto):
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece model in `proto`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    spec = proto.trainer_spec
    pieces = [p.piece for p in proto.pieces]
    if spec.model_type == 1:  # unigram
        # only normal pieces may appear in a Viterbi path: the others are added tokens or byte fallback
        vocab = [(p.piece, p.score if p.type == NORMAL else OFF_PATH) for p in proto.pieces]
        model = models.Unigram(vocab, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    elif spec.model_type == 2:  # bpe
        mergeable = {p.piece for p in proto.pieces if p.type == NORMAL}
        model = models.BPE(
            {p: i for i, p in enumerate(pieces)},
            bpe_merges(pieces, mergeable),
            unk_token=spec.unk_piece,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    else:
        raise DataError(f"SentencePiece model type {spec.model_type} is not supported (bpe or unigram only)")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=False)
    steps = [decoders.Replace(SPACE, " ")] + ([decoders.ByteFallback()] if spec.byte_fallback else [])
    tok.decoder = decoders.Sequence([*steps, decoders.Fuse()])
    return tok


def write_hf_files(folder: Path, *, special_tokens: list[str] | None = None) -> int:
    """Write tokenizer.json, tokenizer_config.json (+ chat template) beside `folder/tokenizer.model`.

    Returns the vocabulary size. `special_tokens` (the chat roles) must be user-defined pieces of the model.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    proto = read_proto(folder / MODEL_FILE)
    _check_supported(proto, folder / MODEL_FILE)
    spec, pieces = proto.trainer_spec, [p.piece for p in proto.pieces]
    roles = (
        list(special_tokens)
        if special_tokens is not None
        else [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    )
    missing = [t for t in roles if t not in pieces]
    if missing:
        raise DataError(f"{folder / MODEL_FILE}: special tokens {missing} are not pieces of the model")
    named = {
        "unk_token": spec.unk_id,
        "bos_token": spec.bos_id,
        "eos_token": spec.eos_id,
        "pad_token": spec.pad_id,
    }

    def added(text: str) -> AddedToken:  # matched verbatim, never merged with the text around it
        return AddedToken(text, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)

    specials = {k: added(pieces[i]) for k, i in named.items() if i >= 0}
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(proto),
        **specials,
        extra_special_tokens=[added(t) for t in roles],
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
        padding_side="right",
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(folder))
    check_ids(hf_tok, folder)
    return len(pieces)


def check_ids(hf_tok, folder: Path) -> None:
    """DataError if the HF tokenizer's special ids differ from the SentencePiece model's."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / MODEL_FILE))
    want = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    got = {k: getattr(hf_tok, f"{k}_token_id") for k in want}
    if len(hf_tok) != sp.get_piece_size() or got != want:
        raise DataError(
            f"{folder}: HF tokenizer ids {got} (size {len(hf_tok)}) differ from SentencePiece "
            f"{want} (size {sp.get_piece_size()})"
        )


def load_tokenizer(folder: Path):
    """The Hugging Face tokenizer of a tokenizer folder, loaded offline."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise DataError(f"{folder}: no tokenizer.json (not a tokenizer folder written by train_tokenizer)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def fingerprint(folder: Path) -> str:
    """sha256 of `folder/tokenizer.model`: the identity of the tokenizer recorded in token manifests."""
    model = Path(folder) / MODEL_FILE
    if not model.is_file():
        raise DataError(f"{model}: tokenizer model not found")
    return sha256_file(model)
