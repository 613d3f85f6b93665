"""Quantization: schemes, fake quantization for QAT, quantized bases, deployment."""
