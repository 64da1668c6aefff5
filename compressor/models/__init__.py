"""Models on disk and in memory: the artifact (`artifact`) and its registered formats
(`formats`), loading one for inference (`loading`), the recipe's data (`data`), the training loop (`training`), and the helpers a step uses to
change a transformers model (`editing`), re-exported here for plugins: `from compressor.models import
load_model, save_model`."""

from compressor.models.editing import (copy_tokenizer, count_macs_and_params, example_inputs, load_model, onnx_opset,
                                       save_model)

__all__ = ["copy_tokenizer", "count_macs_and_params", "example_inputs", "load_model", "onnx_opset", "save_model"]
