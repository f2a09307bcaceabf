"""Deployment: GGUF export for llama.cpp-family runtimes, weight-only quantization for CPU inference,
and evaluation with lm-evaluation-harness. Importing this package imports none of those libraries."""
