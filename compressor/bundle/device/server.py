#!/usr/bin/env python3
"""Serve a compressor bundle over HTTP: OpenAI- and KServe v2-compatible, micro-batched, with Prometheus metrics.

This file is copied into every bundle as `serve.py`; `compressor serve` runs the same code. It needs numpy,
onnxruntime, tokenizers and the server libraries (fastapi, uvicorn, prometheus_client; jinja2 for chat
templates), no torch and no compressor.

    pip install numpy onnxruntime tokenizers fastapi uvicorn prometheus_client jinja2
    python serve.py --port 8000                      # binds 127.0.0.1 unless --host says otherwise

Every bundle answers GET /health (503 until the model is loaded and its golden outputs check), GET /v1/models,
GET /metrics and the KServe v2 routes (/v2/health/live, /v2/health/ready, /v2/models/NAME,
POST /v2/models/NAME/infer with text as a BYTES tensor). The task's answers module adds its own routes
(`Answers.routes`): /predict for classifiers and taggers, /v1/completions and /v1/chat/completions for a
generator. The ASGI app is built by `app(bundle, ...)`, so uvicorn workers, gunicorn or Ray Serve can host it.
"""


import asyncio
import contextlib
import hmac
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as serve.py inside a bundle: its own predict.py beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.modules.setdefault("serve", sys.modules[__name__])  # what the task's server module imports
    import predict as runtime
else:
    from compressor.bundle.device import runtime

#: The environment variable `--api-key` falls back to.
API_KEY_ENV = "COMPRESSOR_API_KEY"


@dataclass
class ServeOptions:
    """How the server batches, limits and protects; `compressor serve --help` documents each."""

    max_batch: int = 32
    max_wait_ms: float = 0.0
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    max_num_seqs: int = 4
    max_model_len: int | None = None
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    threads: int = 0
    model_name: str | None = None


class ApiError(Exception):
    """An error answered as the OpenAI API gives them: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                     413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                     503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("compressor_requests", "Requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("compressor_request_seconds", "Request latency by route", ["route"],
                                 registry=self.registry, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                                                   2.5, 5, 10, 30, 60))
        self.batch = Histogram("compressor_batch_size", "Rows per model call", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue = Gauge("compressor_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.tokens = Counter("compressor_generated_tokens", "Tokens generated", registry=self.registry)
        self.sequences = Gauge("compressor_active_sequences", "Generations holding a decode slot",
                               registry=self.registry)


class MicroBatcher:
    """Requests' texts that wait while the model runs (and, with `max_wait_ms`, for up to that long more) are
    taken together, sorted by length and run in batches of at most `max_batch`, so that clients share forward
    passes and similar lengths pad together."""

    def __init__(self, server: "Server"):
        self.server = server
        self.pending: list[tuple[list[Any], asyncio.Future]] = []
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    async def submit(self, texts: list[Any]) -> list[Any]:
        """The answers to `texts`, computed in a shared batch; ApiError 429 when the queue is full."""
        options = self.server.options
        if sum(len(t) for t, _ in self.pending) + len(texts) > options.max_queue * max(1, options.max_batch):
            raise ApiError(429, f"the queue is full ({options.max_queue} batches waiting); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})
        if self.task is None:
            self.wake = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        self.pending.append((texts, future))
        self.server.metrics.queue.set(len(self.pending))
        self.wake.set()
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        options = self.server.options
        while True:
            await self.wake.wait()
            self.wake.clear()
            # requests that arrive while the model runs wait for the next batch anyway; --max-wait-ms > 0 also
            # holds a batch that is not full for that long, trading latency for fuller batches
            deadline = loop.time() + options.max_wait_ms / 1000
            while sum(len(t) for t, _ in self.pending) < options.max_batch and loop.time() < deadline:
                self.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), deadline - loop.time())
            taken, self.pending = self.pending, []
            self.server.metrics.queue.set(0)
            if taken:
                await self._run(taken)

    async def _run(self, taken: list[tuple[list[Any], asyncio.Future]]) -> None:
        rows = [(len(str(text)), i, j, text) for i, (texts, _) in enumerate(taken) for j, text in enumerate(texts)]
        rows.sort(key=lambda r: r[0])
        answers: dict[tuple[int, int], Any] = {}
        size = max(1, self.server.options.max_batch)
        loop = asyncio.get_running_loop()
        try:
            for k in range(0, len(rows), size):
                chunk = rows[k : k + size]
                self.server.metrics.batch.observe(len(chunk))
                out = await loop.run_in_executor(self.server.executor, self.server.predictor.predict,
                                                 [r[3] for r in chunk])
                answers.update({(r[1], r[2]): a for r, a in zip(chunk, out)})
        except Exception as exc:  # a model failure answers every waiting request, the server stays up
            for _, future in taken:
                if not future.done():
                    future.set_exception(ApiError(500, f"the model failed: {type(exc).__name__}: {exc}"))
            return
        for i, (texts, future) in enumerate(taken):
            if not future.done():
                future.set_result([answers[(i, j)] for j in range(len(texts))])


class Server:
    """One bundle being served: its manifest, the model once loaded, the batcher, the metrics."""

    def __init__(self, root: Path, options: ServeOptions):
        from concurrent.futures import ThreadPoolExecutor

        self.root = Path(root)
        self.options = options
        self.manifest = runtime.read_manifest(self.root)
        runtime.check_files(self.root, self.manifest)
        self.name = options.model_name or self.manifest.get("name") or self.root.name
        self.answers_class = runtime.answers_class(self.manifest, self.root)
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batcher = MicroBatcher(self)
        self.predictor: Any = None
        self.problem: str | None = None
        self.ready = threading.Event()
        self.created = int(time.time())

    def load(self) -> None:
        """Load the model and check its golden outputs (in a thread: /health answers 503 meanwhile)."""
        try:
            predictor = runtime.Predictor(self.root, self.manifest, threads=self.options.threads)
            runtime.check_golden(predictor)  # as verify does: the tolerance for this CPU's int8 kernel class
            self.predictor = predictor
            if hasattr(predictor.answers, "start_serving"):
                predictor.answers.start_serving(self)
            self.ready.set()
        except Exception as exc:
            self.problem = f"{type(exc).__name__}: {exc}"

    def require_ready(self) -> None:
        """ApiError 503 until the model is loaded."""
        if not self.ready.is_set():
            raise ApiError(503, self.problem or "the model is loading; retry shortly", code="loading",
                           headers={"Retry-After": "1"})

    def check_model(self, name: str | None, param: str = "model") -> None:
        """ApiError 404 for a model name other than this bundle's."""
        if name not in (None, "", self.name):
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.name!r}", param=param,
                           code="model_not_found")

    def add_predict_route(self, app: Any) -> None:
        """POST /predict: {"inputs": text or [texts]} → one answer per text, micro-batched across clients."""
        from fastapi import Request
        from fastapi.responses import JSONResponse

        @app.post("/predict")
        async def predict(request: Request) -> Any:
            body = await read_json(request)
            inputs = body.get("inputs", body.get("input"))
            single = isinstance(inputs, str) or (self.manifest.get("input") == "words" and _is_words(inputs))
            texts = [inputs] if single else inputs
            if not isinstance(texts, list) or not texts or not all(isinstance(t, (str, list)) for t in texts):
                raise ApiError(400, "`inputs` must be a text or a non-empty list of texts", param="inputs")
            self.require_ready()
            answers = await self.batcher.submit(texts)
            return JSONResponse(answers[0] if single else answers)  # plain JSON: no response-model encoding

    async def answer(self, texts: list[Any]) -> list[Any]:
        """Answers for KServe's infer: batched for a one-pass task, the task's own `serve_answer` otherwise."""
        self.require_ready()
        own = getattr(self.predictor.answers, "serve_answer", None)
        return await own(texts) if own else await self.batcher.submit(texts)


def _is_words(value: Any) -> bool:
    """Whether a tagger's input is one row given as words (a list of strings without spaces)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value) and \
        not any(" " in v for v in value)


async def read_json(request: Any) -> dict[str, Any]:
    """The request's JSON object; ApiError 413 over the body limit, 400 when the body is not a JSON object."""
    raw = await request.body()
    limit = request.app.state.server.options.max_body_bytes
    if len(raw) > limit:
        raise ApiError(413, f"the body is {len(raw)} bytes; this server takes at most {limit} (--max-body-bytes)",
                       code="body_too_large")
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def app(bundle: str | Path, options: ServeOptions | None = None, **settings: Any) -> Any:
    """The ASGI app serving `bundle` (a directory): checksums checked now, the model loaded in the background.
    `settings` override ServeOptions fields. Raises runtime.BundleError for a bundle that is not intact."""
    from fastapi import FastAPI

    options = options or ServeOptions(**settings)
    if options.api_key is None:
        options.api_key = os.environ.get(API_KEY_ENV) or None
    server = Server(Path(bundle), options)

    async def lifespan(_: Any) -> Any:
        threading.Thread(target=server.load, name="load", daemon=True).start()
        yield
        stop = getattr(server.predictor.answers if server.predictor else None, "stop_serving", None)
        if stop:
            stop()
        server.executor.shutdown(wait=False)

    api = FastAPI(title=f"compressor: {server.name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    api.state.server = server
    _install_middleware(api, server)
    _common_routes(api, server)
    server.answers_class.routes(api, server)
    return api


def _install_middleware(api: Any, server: Server) -> None:
    """Errors in the OpenAI shape, the body limit, the API key, CORS when asked, and request metrics."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @api.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(ApiError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                                         code="invalid_json").body(), status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(ApiError(400, f"{where or 'the body'}: {first.get('msg', 'invalid')}", param=where,
                                     code="invalid_value").body(), status_code=400)

    api.add_middleware(Guard, server=server)

    if server.options.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        api.add_middleware(CORSMiddleware, allow_origins=server.options.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])


class Guard:
    """Pure ASGI middleware (no per-request task, unlike FastAPI's @middleware): the API key (where one is set;
    /health is open), the declared body size, request metrics, and a 500 in the OpenAI shape for anything a
    handler did not expect, so that no request can take the process down."""

    def __init__(self, app: Any, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500, False]

        async def tracked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0], status[1] = message["status"], True
            await send(message)

        try:
            _check_request(scope, self.server)
            await self.app(scope, receive, tracked)
        except ApiError as exc:
            await _send_error(tracked, exc)
        except Exception as exc:
            if not status[1]:
                await _send_error(tracked, ApiError(500, f"{type(exc).__name__}: {exc}"))
        route = getattr(scope.get("route"), "path", "unmatched")  # the template: no client text in labels
        self.server.metrics.requests.labels(route, str(status[0])).inc()
        self.server.metrics.latency.labels(route).observe(time.perf_counter() - started)


async def _send_error(send: Any, exc: ApiError) -> None:
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _check_request(scope: dict[str, Any], server: Server) -> None:
    """ApiError 401 without the API key (where one is set; /health is open), 413 for a declared body over the
    limit (read_json checks the bytes that arrive)."""
    headers = dict(scope.get("headers") or [])
    key = server.options.api_key
    if key and scope.get("path") != "/health":
        given = headers.get(b"authorization", b"")
        if not hmac.compare_digest(given, f"Bearer {key}".encode()):
            raise ApiError(401, "a valid API key is required: send `Authorization: Bearer KEY`", code="invalid_api_key")
    length = headers.get(b"content-length", b"").decode()
    if length.isdigit() and int(length) > server.options.max_body_bytes:
        raise ApiError(413, f"the body is {int(length)} bytes; this server takes at most "
                            f"{server.options.max_body_bytes} (--max-body-bytes)", code="body_too_large")


def _common_routes(api: Any, server: Server) -> None:
    """Health, models, metrics and the KServe v2 protocol."""
    from fastapi import Request, Response

    @api.get("/health")
    async def health() -> Any:
        server.require_ready()
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "compressor"}]}

    @api.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v2/health/live")
    async def live() -> Any:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready() -> Any:
        server.require_ready()
        return {"ready": True}

    @api.get("/v2/models/{name}")
    async def metadata(name: str) -> Any:
        server.check_model(name, "name")
        return {"name": server.name, "platform": "onnxruntime", "versions": ["1"],
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "prediction", "datatype": "BYTES", "shape": [-1]}]}

    @api.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Any:
        server.check_model(name, "name")
        body = await read_json(request)
        texts = _kserve_texts(body)
        answers = await server.answer(texts)
        return {"model_name": server.name, "id": body.get("id"),
                "outputs": [{"name": "prediction", "datatype": "BYTES", "shape": [len(answers)],
                             "data": [json.dumps(a, ensure_ascii=False) for a in answers]}]}


def _kserve_texts(body: dict[str, Any]) -> list[str]:
    """The texts of a KServe v2 infer request: its first input, a BYTES tensor of strings."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], dict):
        raise ApiError(400, "`inputs` must be a list with one tensor {name, datatype, shape, data}", param="inputs")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise ApiError(400, f"inputs[0].datatype is {tensor.get('datatype')!r}; text goes in a BYTES tensor",
                       param="inputs[0].datatype")
    data = tensor.get("data")
    if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
        raise ApiError(400, "inputs[0].data must be a non-empty list of strings", param="inputs[0].data")
    return data


def parse_args(argv: list[str]) -> Any:
    """The command line of serve.py (compressor serve takes the same options)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(Path(__file__).resolve().parent), help="Bundle directory.")
    add_options(parser)
    return parser.parse_args(argv)


#: (flag, ServeOptions field or server setting, type, default, help): shared by serve.py and compressor serve.
OPTIONS = (
    ("--host", "host", str, "127.0.0.1", "Address to bind (127.0.0.1: this machine only)."),
    ("--port", "port", int, 8000, "Port to bind."),
    ("--max-batch", "max_batch", int, 32, "Most texts per forward pass (classifiers, taggers)."),
    ("--max-wait-ms", "max_wait_ms", float, 0.0, "How long a batch that is not full waits for more requests (0: "
                                                  "none; requests that come while the model runs batch anyway)."),
    ("--max-queue", "max_queue", int, 256, "Requests (batches) that may wait; more get 429."),
    ("--max-body-bytes", "max_body_bytes", int, 1 << 20, "Largest request body; larger get 413."),
    ("--max-num-seqs", "max_num_seqs", int, 4, "Generations decoded together in one batch (KV-cache slots)."),
    ("--max-model-len", "max_model_len", int, None, "Longest prompt + answer in tokens (default: the model's "
                                                     "context, at most 2048)."),
    ("--api-key", "api_key", str, None, f"Require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})."),
    ("--cors-origin", "cors_origins", str, None, "Allow browser requests from this origin (repeatable)."),
    ("--threads", "threads", int, 0, "onnxruntime intra-op threads (0: all cores)."),
    ("--model-name", "model_name", str, None, "The model id clients name (default: the run's name)."),
    ("--grace", "grace", float, 30.0, "Seconds SIGTERM waits for requests in flight."),
)


def add_options(parser: Any) -> None:
    """Add OPTIONS to an argparse parser."""
    for flag, dest, kind, default, text in OPTIONS:
        if dest == "cors_origins":
            parser.add_argument(flag, dest=dest, action="append", default=[], help=text)
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=default, help=text)


def serve(bundle: Path, settings: dict[str, Any]) -> None:
    """Check the bundle's files, then serve it with uvicorn until SIGTERM or Ctrl-C (requests in flight get
    `grace` seconds). Raises runtime.BundleError, naming the file, for a bundle that is not intact."""
    import uvicorn

    settings = dict(settings)
    host, port, grace = settings.pop("host"), settings.pop("port"), settings.pop("grace")
    api = app(bundle, ServeOptions(**settings))
    config = uvicorn.Config(api, host=host, port=port, timeout_graceful_shutdown=grace, log_level="warning",
                            access_log=False)
    print(f"serving {api.state.server.name} on http://{host}:{port} (Ctrl-C or SIGTERM stops)", file=sys.stderr,
          flush=True)
    import signal

    # uvicorn handles SIGTERM and SIGINT while it runs (stop accepting, finish what is in flight) and then
    # raises them again for the handlers it found: these keep that second delivery from killing the process.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    uvicorn.Server(config).run()


def main(argv: list[str]) -> int:
    """Command line: serve this bundle."""
    args = vars(parse_args(argv))
    try:
        serve(Path(args.pop("bundle")), args)
    except runtime.BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
