"""Built-in exporters (installed as `compressor.export`); each registers through the public hooks."""
