"""Triton Inference Server backend serving redrafter engines."""
