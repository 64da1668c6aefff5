"""Sentence embeddings on the device: one vector per text from the graph's `sentence_embedding` output (pooling and
normalization are inside the model), the cosine similarity of texts, and OpenAI's `/v1/embeddings` when served.
numpy, onnxruntime and tokenizers only (fastapi when served)."""

# no `from __future__ import annotations`: FastAPI reads the route's `Request` annotation as a class
import base64
import sys
from typing import Any

if "predict" in sys.modules:  # inside a bundle: its own predict.py, which loaded this file
    from predict import LogitAnswers
else:
    from compressor.bundle.device.runtime import LogitAnswers


def _sentences(inputs: list[Any]) -> list[str]:
    """Golden inputs as single sentences (a pair of the eval data gives both of its sentences)."""
    return [s for t in inputs for s in (t if isinstance(t, (tuple, list)) else (t,))]


def cosine_matrix(vectors: Any) -> Any:
    """Cosine similarity of every pair of rows."""
    import numpy as np

    v = np.asarray(vectors, dtype=np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v @ v.T


class Answers(LogitAnswers):
    """{embedding, tokens} per text; golden outputs are the embeddings of single sentences."""

    def decode(self, texts: list[Any], encodings: list[Any], logits: Any) -> list[Any]:
        """Each text's vector (as the model gives it) and its token count."""
        return [{"embedding": [float(x) for x in row], "tokens": int(sum(e.attention_mask))}
                for row, e in zip(logits, encodings)]

    def golden(self, inputs: list[Any], new_tokens: int) -> list[dict[str, Any]]:
        """The embeddings of up to four sentences, each run alone."""
        return super().golden(_sentences(inputs)[:4], new_tokens)

    def summary(self, texts: list[str]) -> str:
        """What `predict.py TEXT…` prints: the embeddings' shape and the texts' cosine similarities."""
        import json

        import numpy as np

        vectors = np.asarray(self.predictor.logits(texts))
        cos = cosine_matrix(vectors)
        lines = [json.dumps({"shape": list(vectors.shape), "dtype": str(vectors.dtype)})]
        if len(texts) == 2:
            lines.append(json.dumps({"cosine_similarity": round(float(cos[0, 1]), 6)}))
        elif len(texts) > 2:
            lines.append(json.dumps({"cosine_similarity": [[round(float(c), 6) for c in row] for row in cos]}))
        return "\n".join(lines)

    @classmethod
    def routes(cls, app: Any, server: Any) -> None:
        """POST /predict (as a classifier's, each answer an embedding) and OpenAI's POST /v1/embeddings."""
        server.add_predict_route(app)
        if "predict" in sys.modules and not __package__:
            from serve import ApiError, read_json
        else:
            from compressor.bundle.device.server import ApiError, read_json
        from fastapi import Request
        from fastapi.responses import JSONResponse

        @app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Any:
            body = await read_json(request)
            server.check_model(body.get("model"))
            texts = body.get("input")
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise ApiError(400, "`input` must be a text or a non-empty list of texts (token id arrays are not "
                                    "accepted)", param="input")
            if any(not t for t in texts):
                raise ApiError(400, "`input` holds an empty text", param="input")
            form = body.get("encoding_format") or "float"
            if form not in ("float", "base64"):
                raise ApiError(400, f"encoding_format {form!r}: use float or base64", param="encoding_format")
            server.require_ready()
            answers = await server.batcher.submit(texts)
            width = len(answers[0]["embedding"])
            if body.get("dimensions") not in (None, width):
                raise ApiError(400, f"this model's embeddings have {width} dimensions; `dimensions` "
                                    f"{body.get('dimensions')!r} would need a Matryoshka-trained model",
                               param="dimensions")
            tokens = sum(a["tokens"] for a in answers)
            data = [{"object": "embedding", "index": i, "embedding": _encoded(a["embedding"], form)}
                    for i, a in enumerate(answers)]
            return JSONResponse({"object": "list", "data": data, "model": server.name,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encoded(vector: list[float], form: str) -> Any:
    """A vector as OpenAI encodes it: a list of floats, or base64 of its little-endian float32 bytes."""
    if form == "float":
        return vector
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
