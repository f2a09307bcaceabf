"""Test helper, not production code: put this folder first on PYTHONPATH (dist_helpers.CPU_FP16_ENV)
and every Python process it starts, launcher ranks included, lets DeepSpeed's CPU accelerator train
in fp16 on CPUs without AVX512-FP16/AMX-FP16. torch then emulates the half matmuls (2.5-3x slower
than fp32), which is enough to exercise the fp16 path (dynamic loss scaling, overflow skips) in CPU
tests. It must act before DeepSpeed's zero.Init picks the dtype, hence an interpreter-start hook."""

import os

if os.environ.get("GRISTMILL_TEST_CPU_FP16") == "emulate":
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_fp16_supported = lambda self: True
    CPU_Accelerator.supported_dtypes = lambda self: [torch.float, torch.bfloat16, torch.float16]
