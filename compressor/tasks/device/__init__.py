"""The device-side half of each built-in task: how a bundle's model outputs become answers.

Each module here is copied into the bundles of its task beside `predict.py` (the task's `device_module`)
and runs with numpy, onnxruntime and tokenizers only. It defines `Answers(predictor)` with `predict`,
`golden` and `check` (compressor.bundle.device.runtime.Answers documents the contract); the bundle's
manifest names the module in `output`, so that the device runtime needs no list of tasks.
"""
