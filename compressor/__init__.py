"""compressor: chain model-compression steps from a checked recipe, measure every step, ship a bundle.

Importing this package is cheap: torch, transformers and onnxruntime are imported only
inside the functions that need them.
"""

__version__ = "0.1.0"

#: Version of the plugin API (hooks and the Step contract). Plugins may declare the range they support.
PLUGIN_API_VERSION = "1.3"
