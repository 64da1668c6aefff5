"""Deprecated import path: compressor.evaluators.runtime moved to compressor.models.loading (plugin API 1.1); it goes in the next release."""

import warnings

from compressor.models.loading import *  # noqa: F401,F403
from compressor.models.loading import LoadedModel as Runner  # noqa: F401  (its name in plugin API 1.0)

warnings.warn("compressor.evaluators.runtime moved to compressor.models.loading; import it from there (this path goes in the next release)",
              DeprecationWarning, stacklevel=2)
