"""Deprecated import path: compressor.evaluators moved to compressor.evaluate (plugin API 1.1); it goes in the next release."""

import warnings

from compressor.evaluate import *  # noqa: F401,F403

warnings.warn("compressor.evaluators moved to compressor.evaluate; import it from there (this path goes in the next release)",
              DeprecationWarning, stacklevel=2)
