"""The code copied into every bundle: it runs with numpy, onnxruntime and tokenizers only (no torch, no compressor)."""
