"""`model.path` as a Hugging Face Hub id, resolved as transformers resolves it: from huggingface_hub's own
cache, honouring HF_HUB_OFFLINE. The cache is laid out by huggingface_hub itself (snapshot_download from a
local server that answers the Hub's API for one repository), then read with no server and HF_HUB_OFFLINE=1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import recipe_text

REPO_ID = "tiny-org/tiny-sst2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _serve(model_dir: Path) -> ThreadingHTTPServer:
    """A local stand-in for the Hub: the model-info API and the resolve endpoint of one repository."""
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path.startswith(f"/api/models/{REPO_ID}/tree/"):  # huggingface_hub 1.x lists the files here
                tree = [{"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
                        for name, body in sorted(files.items())]
                self._reply(json.dumps(tree).encode(), "application/json")
                return
            if path.startswith(f"/api/models/{REPO_ID}"):
                info = {"id": REPO_ID, "modelId": REPO_ID, "sha": COMMIT, "private": False,
                        "siblings": [{"rfilename": name} for name in sorted(files)]}
                self._reply(json.dumps(info).encode(), "application/json")
                return
            prefix = f"/{REPO_ID}/resolve/"
            if path.startswith(prefix):
                name = path[len(prefix):].split("/", 1)[1]
                if name in files:
                    etag = hashlib.sha256(files[name]).hexdigest()
                    self._reply(files[name], "application/octet-stream",
                                {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'})
                    return
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _env(hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(hf_home), **extra}


def test_hub_id_resolves_from_huggingface_hubs_cache_offline(tmp_path, tiny_text_model, sst2_small):
    hf_home = tmp_path / "hf"
    server = _serve(tiny_text_model)
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        download = subprocess.run([sys.executable, "-c", f"from huggingface_hub import snapshot_download; "
                                   f"print(snapshot_download({REPO_ID!r}))"], capture_output=True, text=True,
                                  env=_env(hf_home, HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1"), timeout=120)
        assert download.returncode == 0, download.stderr
    finally:
        server.shutdown()
    snapshot = Path(download.stdout.strip().splitlines()[-1])
    assert snapshot.parts[-2:] == ("snapshots", COMMIT) and (snapshot / "model.safetensors").is_symlink()

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(REPO_ID, sst2_small["train"], sst2_small["eval"], "  - uses: export-onnx\n"))
    cli = [sys.executable, "-m", "compressor", "check", str(recipe)]
    offline = subprocess.run(cli, capture_output=True, text=True, env=_env(hf_home, HF_HUB_OFFLINE="1"), timeout=120)
    assert offline.returncode == 0, offline.stderr
    assert f"model: {snapshot}" in offline.stdout  # the snapshot directory huggingface_hub laid out

    # an id that is not in the cache, offline: one clear message, exit 2
    recipe.write_text(recipe_text("tiny-org/not-downloaded", sst2_small["train"], sst2_small["eval"],
                                  "  - uses: export-onnx\n"))
    missing = subprocess.run(cli, capture_output=True, text=True, env=_env(hf_home, HF_HUB_OFFLINE="1"), timeout=120)
    assert missing.returncode == 2 and "not in the Hugging Face cache" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize("spec", ["models/minilm", "org/name@main"])
def test_hub_id_pattern(spec):
    from compressor.recipe.model_input import HUB_ID

    assert HUB_ID.fullmatch(spec) and not HUB_ID.fullmatch("/abs/path") and not HUB_ID.fullmatch("a/b/c")
