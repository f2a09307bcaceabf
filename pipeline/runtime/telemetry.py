"""Throughput accounting: model FLOP utilisation against a per-device, per-precision peak table.

MFU = achieved model TFLOP/s per device / the device's dense peak for the training precision.
The peak comes from `train.peak_tflops` when set, else from PEAK_TFLOPS by the device's name;
a device the table does not know gets MFU "n/a", never a guessed peak (an unknown GPU scored
against an A100 is how dashboards show 150% MFU).
"""

from __future__ import annotations

# Dense (no sparsity) peak TFLOP/s per device. Matched by substring of the device name in order,
# so the more specific names come first. fp32 means plain FP32 (not TF32).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]


def peak_tflops(device: str, precision: str, override: float = 0.0) -> float | None:
    """Peak dense TFLOP/s of one `device` in `precision`; None when unknown (MFU is then "n/a")."""
    if override > 0:
        return override
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device.lower():
            return peaks.get(precision)
    return None


def mfu(tflops_per_device: float, peak: float | None) -> float | str:
    """Model FLOP utilisation in [0, 1], or "n/a" without a known peak."""
    return "n/a" if not peak else tflops_per_device / peak
