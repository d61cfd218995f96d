"""Quantization, backend-neutral: what to quantize (`spec`: schemes, per-component precision, what stays
float, gates) and the calibration data recorded along the Bundle's own sampler (`calibration`).

How each toolchain quantizes lives beside its exporter (`export/onnx_quantize.py`); this package
imports no backend.
"""
