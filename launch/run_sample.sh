#!/usr/bin/env bash
# Run the whole chain on the shipped sample: raw Wikipedia-format dump -> cleaned shards ->
# SentencePiece tokenizer -> Megatron token shards -> DeepSpeed pretraining -> SFT -> generation.
#
#   bash launch/run_sample.sh
#
# Outputs: out/wiki_sample/ (data), tokenizers/wiki_sample/, runs/wiki_sample/ (pretraining),
# runs/sft_sample/ (fine-tuning; its hf/ folder is a Hugging Face model). Re-running resumes:
# finished shards and runs are skipped. NUM_GPUS sets the ranks (default 2; CPU ranks without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NUM_GPUS="${NUM_GPUS:-2}"
step() { echo; echo "=== $* ==="; }

step "1/6 read and clean the Wikipedia dump (Ray)"
python launch/prepare_data.py --config configs/data/wiki_sample.yaml "steps=[clean]"
step "2/6 train the SentencePiece tokenizer"
python launch/train_tokenizer.py --config configs/tokenizer/wiki_sample.yaml
step "3/6 tokenize into Megatron .bin/.idx shards"
python launch/prepare_data.py --config configs/data/wiki_sample.yaml
step "4/6 pretrain a tiny Llama with DeepSpeed ZeRO-3 on ${NUM_GPUS} ranks"
deepspeed -q --num_gpus "$NUM_GPUS" launch/pretrain.py --config configs/pretrain/wiki_sample.yaml
step "5/6 fine-tune it on the instruction sample"
deepspeed -q --num_gpus "$NUM_GPUS" launch/finetune.py --config configs/finetune/sft_sample.yaml
step "6/6 generate from the fine-tuned Hugging Face folder"
python launch/generate.py --model runs/sft_sample/hf --prompt "What is the Python module json for?"
