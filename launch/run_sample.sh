#!/usr/bin/env bash
# Run the whole chain on the shipped sample: raw Wikipedia-format dump -> cleaned shards ->
# SentencePiece tokenizer -> Megatron token shards -> DeepSpeed pretraining -> SFT -> generation.
#
#   bash launch/run_sample.sh          # the quick sample (a few minutes on 2 CPU cores)
#   bash launch/run_sample.sh --full   # the same chain trained longer (runs/wiki_sample_full, runs/sft_sample_full)
#
# Outputs: out/wiki_sample/ (data), tokenizers/wiki_sample/, runs/wiki_sample/ (pretraining),
# runs/sft_sample/ (fine-tuning; its hf/ folder is a Hugging Face model). Re-running resumes:
# finished shards and runs are skipped. NUM_GPUS sets the ranks (default 2; CPU ranks without a GPU).
# Each step's elapsed time is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NUM_GPUS="${NUM_GPUS:-2}"

# --full: twice the pretraining steps and 2.5x the fine-tuning steps, in runs of their own, so the
# quick sample's checkpoints are never resumed with another schedule.
pretrain_args=() finetune_args=() sft_run=sft_sample
case "${1:-}" in
  "") ;;
  --full)
    pretrain_args=(run.name=wiki_sample_full train.max_steps=240 train.eval_every=80 train.save_every=120)
    finetune_args=(init_from=runs/wiki_sample_full run.name=sft_sample_full out=runs/sft_sample_full/hf
      train.max_steps=100 train.eval_every=50)
    sft_run=sft_sample_full
    ;;
  *) echo "usage: bash launch/run_sample.sh [--full]" >&2; exit 2 ;;
esac

names=() times=() t_all=$SECONDS t_step=$SECONDS
step() {
  [ ${#names[@]} -gt 0 ] && times+=($((SECONDS - t_step)))
  t_step=$SECONDS names+=("$*")
  echo; echo "=== ${#names[@]}/6 $* ==="
}
report() {
  times+=($((SECONDS - t_step)))
  echo; echo "=== elapsed ==="
  for i in "${!names[@]}"; do printf '%d/6 %-58s %4d s\n' $((i + 1)) "${names[$i]}" "${times[$i]}"; done
  printf '%-62s %4d s\n' "total" $((SECONDS - t_all))
}

step "read and clean the Wikipedia dump (Ray)"
python launch/prepare_data.py --config configs/data/wiki_sample.yaml "steps=[clean]"
step "train the SentencePiece tokenizer"
python launch/train_tokenizer.py --config configs/tokenizer/wiki_sample.yaml
step "tokenize into Megatron .bin/.idx shards"
python launch/prepare_data.py --config configs/data/wiki_sample.yaml
step "pretrain a tiny Llama with DeepSpeed ZeRO-3 on ${NUM_GPUS} ranks"
deepspeed -q --num_gpus "$NUM_GPUS" launch/pretrain.py --config configs/pretrain/wiki_sample.yaml "${pretrain_args[@]}"
step "fine-tune it on the instruction sample"
deepspeed -q --num_gpus "$NUM_GPUS" launch/finetune.py --config configs/finetune/sft_sample.yaml "${finetune_args[@]}"
step "generate from the fine-tuned Hugging Face folder"
python launch/generate.py --model "runs/$sft_run/hf" --prompt "What is the Python module json for?"
report
