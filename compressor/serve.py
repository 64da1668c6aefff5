"""Serving bundles: the `compressor serve` command and, for uvicorn workers, gunicorn or Ray Serve, the ASGI app
`compressor.serve.app(bundle, **options)`. The server itself is compressor.bundle.device.server, the same file
every bundle carries as serve.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from compressor.bundle.device.server import OPTIONS, ServeOptions, app

__all__ = ["ServeOptions", "app", "options", "run"]


def options(fn: Callable) -> Callable:
    """The server's options (compressor.bundle.device.server.OPTIONS) as click options."""
    for flag, dest, kind, default, text in reversed(OPTIONS):
        if dest == "cors_origins":
            fn = click.option(flag, dest, multiple=True, help=text)(fn)
        else:
            fn = click.option(flag, dest, type=kind, default=default, show_default=default is not None,
                              help=text)(fn)
    return fn


def run(path: Path, settings: dict[str, Any]) -> None:
    """`compressor serve PATH`: the bundle (directory or .tar.gz) served until SIGTERM; InputError (exit 2) for a
    bundle that is not intact or a machine without the server libraries."""
    import tempfile

    from compressor.bundle.device import runtime as bundle_runtime
    from compressor.bundle.device.server import serve
    from compressor.bundle.writer import open_bundle
    from compressor.errors import InputError

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if not _importable(m)]
    if missing:
        raise InputError(f"serving needs {', '.join(missing)}, not installed here", where="compressor serve",
                         hint="pip install 'compressor[serve]'")
    settings["cors_origins"] = list(settings.get("cors_origins") or ())
    with tempfile.TemporaryDirectory() as work:
        try:
            serve(open_bundle(path, Path(work)), settings)
        except bundle_runtime.BundleError as exc:
            raise InputError(str(exc), where=str(path), hint="rebuild it with compressor bundle") from None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
