"""Peak host memory of the fine-tuning export: streamed in the training dtype against the old way.

    python bench/export_memory.py                       # ~100M parameters (412 MB in fp32), bf16 ZeRO-3
    python bench/export_memory.py --hidden 2048 --layers 12 --precision fp32 --zero 2

Builds an init folder (a random Llama of the given shape and a SentencePiece tokenizer trained on
the shipped instruction sample), fine-tunes it for one step in one process (launch/finetune.py:
a real DeepSpeed checkpoint with its parity batch), then exports that checkpoint twice, each in a
fresh process that reports its peak RSS: `streamed` is what the run does now
(pipeline.finetune.export.export_full: tensor by tensor into safetensors shards in the training
dtype, then one reload in that dtype for the logits check); `baseline` is what it did before
(DeepSpeed's consolidated fp32 state dict, an fp32 model loading it, save_pretrained, and an fp32
reload). Prints both peaks (VmRSS, which also counts the memory-mapped checkpoint pages, and the
anonymous memory the process owns), the bytes written and the ratios streamed / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SAMPLE = REPO / "tests" / "data" / "sample" / "instructions.jsonl"
CONFIG = REPO / "configs" / "finetune" / "sft_tiny.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the model")
    p.add_argument("--layers", type=int, default=8, help="decoder layers")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="training precision")
    p.add_argument("--zero", type=int, choices=[1, 2, 3], default=3, help="ZeRO stage of the fine-tuning run")
    p.add_argument("--workdir", type=Path, help="keep the run here (default: a temp folder, removed)")
    p.add_argument("--child", choices=["streamed", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_init(folder: Path, hidden: int, layers: int) -> Path:
    """Tokenizer + random-init LlamaForCausalLM (fp32) in one HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.tokenizer import hf
    from pipeline.tokenizer.config import TokenizerConfig
    from pipeline.tokenizer.train import train_model

    lines = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        lines += [x for x in (rec["instruction"], rec.get("input", ""), rec["output"]) if x.strip()]
    cfg = TokenizerConfig(name="bench", inputs=["-"], vocab_size=2000)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(train_model(lines, cfg))
    hf.write_hf_files(folder, special_tokens=cfg.special_tokens)
    tok = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def child(args: argparse.Namespace) -> None:
    """One export in this process; prints {"peak_rss_mib", "imports_mib", "bytes"} as JSON."""
    from transformers import LlamaForCausalLM  # noqa: F401

    from pipeline.config import load_config
    from pipeline.finetune.config import FinetuneConfig
    from pipeline.finetune.export import build_plain, check_reload, export_full, load_full_state, model_config
    from pipeline.io import atomic_dir
    from pipeline.runtime import checkpoint
    from pipeline.runtime.engine import checkpoint_reader, consolidated_state_dict

    checkpoint_reader()  # DeepSpeed's reader, imported by both ways: outside the comparison

    before = _rss_mib()
    sampler = _AnonPeak()
    cfg = load_config(FinetuneConfig, CONFIG, json.loads(args.overrides))
    init, tag = Path(cfg.init_from), checkpoint.latest_tag(cfg.run_dir)
    out = cfg.out_dir.with_name(args.child)
    if args.child == "streamed":
        cfg.out = out
        export_full(cfg, tag, init)
    else:  # the export before the streaming one: three fp32 copies, then an fp32 reload
        state = consolidated_state_dict(checkpoint.ckpt_root(cfg.run_dir), tag)
        config = model_config(init, "sft")
        model = build_plain(config, "sft")
        load_full_state(model, state, tag)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            check_reload(tmp, "sft", config)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    anon = sampler.stop()
    print(json.dumps({"peak_rss_mib": peak, "imports_mib": before, "anon_peak_mib": anon, "bytes": size}))


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


class _AnonPeak:
    """Samples RssAnon every 20 ms: the memory the process owns, without the memory-mapped checkpoint
    pages that VmRSS also counts (the kernel drops those under pressure)."""

    def __init__(self):
        import threading

        self.base, self.peak, self.done = _rss_mib("RssAnon"), 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, _rss_mib("RssAnon") - self.base)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def run_child(kind: str, overrides: list[str], env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--overrides", json.dumps(overrides)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{kind} export failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gristmill-export-bench-"))
    init = make_init(work / "init", args.hidden, args.layers)
    overrides = [
        f"init_from={init}",
        f"run.dir={work}",
        "run.name=ft",
        f"out={work / 'ft' / 'hf'}",
        f"parallel.precision={args.precision}",
        f"parallel.zero_stage={args.zero}",
        "data.seq_len=128",
        "batch.global_size=2",
        "batch.micro_size=2",
        "train.max_steps=1",
        "train.eval_every=0",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "launch/finetune.py", "--config", str(CONFIG), *overrides],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"fine-tuning failed:\n{proc.stderr[-3000:]}")
    new, old = (run_child(kind, overrides, env) for kind in ("streamed", "baseline"))
    from safetensors import safe_open

    with safe_open(init / "model.safetensors", "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    print(f"model: {params / 1e6:.0f}M parameters, {args.precision}, ZeRO-{args.zero}")
    for name, row in (("streamed", new), ("baseline", old)):
        extra = row["peak_rss_mib"] - row["imports_mib"]
        print(
            f"{name:9s} peak RSS {row['peak_rss_mib']:6.0f} MiB, {extra:6.0f} above the imports, of which "
            f"anonymous {row['anon_peak_mib']:6.0f}; weights written {row['bytes'] / 2**20:5.0f} MiB"
        )
    ratio = (new["peak_rss_mib"] - new["imports_mib"]) / (old["peak_rss_mib"] - old["imports_mib"])
    print(f"streamed / baseline, peak RSS above the imports: {ratio:.2f}")
    print(f"streamed / baseline, peak anonymous memory: {new['anon_peak_mib'] / old['anon_peak_mib']:.2f}")


if __name__ == "__main__":
    main()
