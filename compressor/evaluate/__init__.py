"""Built-in evaluators: task metrics on PyTorch (`hf`) and ONNX Runtime (`onnx`) artifacts."""
