"""Bundles: the writer (host side) and the runtime copied into every bundle (device side: numpy, onnxruntime, tokenizers)."""
