"""compressor-lowrank: a third-party compressor plugin adding the `lowrank` step."""

__version__ = "0.1.0"
