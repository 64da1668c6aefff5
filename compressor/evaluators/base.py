"""Deprecated import path: compressor.evaluators.base moved to compressor.evaluate.base (plugin API 1.1); it goes in the next release."""

import warnings

from compressor.evaluate.base import *  # noqa: F401,F403

warnings.warn("compressor.evaluators.base moved to compressor.evaluate.base; import it from there (this path goes in the next release)",
              DeprecationWarning, stacklevel=2)
