"""Deprecated import path: compressor.data moved to compressor.models.data (plugin API 1.1); it goes in the next release."""

import warnings

from compressor.models.data import *  # noqa: F401,F403

warnings.warn("compressor.data moved to compressor.models.data; import it from there (this path goes in the next release)",
              DeprecationWarning, stacklevel=2)
