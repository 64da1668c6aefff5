"""Deprecated import path: compressor.artifact moved to compressor.models.artifact (plugin API 1.1); it goes in the next release."""

import warnings

from compressor.models.artifact import *  # noqa: F401,F403

warnings.warn("compressor.artifact moved to compressor.models.artifact; import it from there (this path goes in the next release)",
              DeprecationWarning, stacklevel=2)
