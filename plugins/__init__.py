"""Built-in compression plugins (installed as `compressor.plugins`); each registers through the public hooks."""
