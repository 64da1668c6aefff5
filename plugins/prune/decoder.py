"""`prune` on Llama-family decoder LLMs (llama, mistral, qwen2, qwen3, phi3; a causal-LM task): whole
decoder layers dropped by index or by measured block influence (ShortGPT, Men et al. 2024), and the MLP
narrowed by the same number of intermediate channels in every layer (where the MLP has separate gate, up
and down projections: not phi3, whose gate_up_proj is one Linear). Attention heads are not pruned (GQA groups).

Called by the `prune` step (`__init__.py` beside this module) when the model is a decoder; torch is imported inside the functions.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from compressor.errors import RecipeError, StepError

if TYPE_CHECKING:
    from compressor.plugins.prune import PruneConfig

    from compressor.models.artifact import Artifact
    from compressor.step import StepContext

#: Model types whose decoder layers sit at `model.layers`, each with `self_attn` and an `mlp`.
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "phi3")
#: Of those, the ones whose MLP has separate gate_proj / up_proj / down_proj Linears (what ffn pruning narrows).
SPLIT_MLP = ("llama", "mistral", "qwen2", "qwen3")


def is_decoder(model_config: dict[str, Any] | Any) -> bool:
    """Whether a config (config.json as a dict, or a transformers config) is a supported decoder LLM."""
    model_type = model_config.get("model_type") if isinstance(model_config, dict) else model_config.model_type
    return model_type in DECODERS


def unsupported_task(model_type: str, task: Any) -> str | None:
    """Why prune cannot run a decoder of `model_type` under `task` (a registered Task), or None."""
    if task.auto_class != "AutoModelForCausalLM":
        return f"prune handles {model_type} decoders as causal LMs (AutoModelForCausalLM), not as {task.name} models"
    return None


def check(config: PruneConfig, model_config: dict[str, Any], has_train: bool) -> None:
    """Decoder-specific plan checks (raise RecipeError); the layer-index checks are prune's own."""
    n_layers, width = model_config.get("num_hidden_layers"), model_config.get("intermediate_size")
    if not isinstance(n_layers, int) or not isinstance(width, int):
        raise RecipeError(f"model_type {model_config.get('model_type')!r} has no num_hidden_layers / "
                          "intermediate_size in its config.json", where="uses")
    if config.ratios()["heads"]:
        raise RecipeError("prune does not remove attention heads of decoder LLMs (GQA groups); use keep/keep_layers "
                          "or ffn_ratio", where="with.head_ratio" if config.head_ratio is not None else "with.target",
                          hint="set target: ffn (or ffn_ratio), or keep / keep_layers to drop whole layers")
    if config.ratios()["ffn"] and model_config.get("model_type") not in SPLIT_MLP:
        raise RecipeError(f"prune narrows the MLPs of {', '.join(SPLIT_MLP)} decoders; a "
                          f"{model_config.get('model_type')} MLP fuses gate and up into one Linear",
                          where="with", hint="drop whole layers instead (keep or keep_layers)")
    if round(config.ratios()["ffn"] * width) >= width:
        raise RecipeError(f"ffn ratio {config.ratios()['ffn']} would remove all {width} MLP channels", where="with")
    # an explicit layer_choice is in data_splits, so the plan asks for the train rows itself
    if config.keep is not None and config.layer_choice is None and not has_train:
        raise RecipeError("choosing layers by block influence needs calibration text, and the recipe has no "
                          "data.train", where="with.layer_choice",
                          hint="add data.train, or set layer_choice: even (or keep_layers: [...])")


def decoder_layers(model: Any) -> Any:
    """The decoder layers (`model.model.layers`) of a causal LM."""
    try:
        return model.model.layers
    except AttributeError:
        raise StepError(f"prune expects decoder layers at model.layers; {type(model).__name__} has none") from None


def prune(model: Any, artifact: Artifact, config: PruneConfig, ctx: StepContext) -> dict[str, Any]:
    """Drop layers, then narrow the MLPs, in place; returns what the step reports."""
    notes: dict[str, Any] = {"importance": config.importance}
    keep = choose_layers(model, artifact, config, ctx, notes)
    if keep is not None:
        drop_layers(model, keep)
        notes["kept_layers"] = keep
    ratio = config.ratios()["ffn"]
    if ratio:
        if config.importance == "taylor":
            rows = _sample(ctx, config.taylor_batches * config.batch_size)
            accumulate_gradients(model, calibration_batches(artifact, rows, config.batch_size))
        prune_mlp(model, ratio, config.importance, artifact.task)
    notes.update(layers=model.config.num_hidden_layers, intermediate_size=model.config.intermediate_size)
    return notes


def layers_to_keep(config: PruneConfig, n_layers: int) -> list[int] | None:
    """The kept layer indices by `keep_layers` or `keep` (evenly spaced, last kept), or None to keep all;
    for encoders and decoders alike."""
    if config.keep_layers is not None:
        return sorted(set(config.keep_layers))
    if config.keep is not None:
        if config.keep >= n_layers:
            return None
        if config.keep == 1:
            return [n_layers - 1]
        step = (n_layers - 1) / (config.keep - 1)
        return sorted({round(i * step) for i in range(config.keep)})
    return None


def choose_layers(model: Any, artifact: Artifact, config: PruneConfig, ctx: StepContext,
                  notes: dict[str, Any]) -> list[int] | None:
    """The kept layer indices (None: keep all): keep_layers, evenly spaced, or the highest block influence."""
    n = len(decoder_layers(model))
    if config.keep_layers is not None and max(config.keep_layers) >= n:
        raise StepError(f"keep_layers index {max(config.keep_layers)} is out of range for {n} layers")
    if config.keep is None or config.keep >= n or config.layer_choice == "even":
        return layers_to_keep(config, n)
    rows = _sample(ctx, config.calibration_rows)
    scores = block_influence(model, calibration_batches(artifact, rows, config.batch_size))
    notes.update(layer_choice="block-influence", block_influence=scores, calibration_rows=len(rows))
    return keep_most_influential(scores, config.keep)


def _sample(ctx: StepContext, n: int) -> list[Any]:
    """Up to n train rows, drawn with the run's seed."""
    rows = ctx.data.load("train")
    return random.Random(ctx.seed).sample(rows, min(len(rows), n))


def calibration_batches(artifact: Artifact, rows: list[Any], batch_size: int) -> list[dict[str, Any]]:
    """Rows collated as finetune collates them for the task (prompt in the chat template + completion)."""
    from compressor.models.loading import load_tokenizer
    from compressor.models.training import collate

    if not rows:
        raise StepError("no train rows to calibrate on")
    tokenizer = load_tokenizer(artifact.path)
    return [collate(tokenizer, rows[i : i + batch_size], artifact.task, {}, artifact.max_length)
            for i in range(0, len(rows), batch_size)]


def block_influence(model: Any, batches: list[dict[str, Any]]) -> list[float]:
    """BI_i = 1 − mean over real tokens of cos(input of layer i, output of layer i) (ShortGPT)."""
    import torch

    n = len(decoder_layers(model))
    captured: dict[str, Any] = {}
    # hidden_states[-1] is the final norm's output, not the last layer's: take the norm's input instead
    hook = model.model.norm.register_forward_pre_hook(lambda module, args: captured.update(last=args[0]))
    totals, tokens = torch.zeros(n, dtype=torch.float64), 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True, use_cache=False)
                states = [*out.hidden_states[:n], captured["last"]]
                real = batch["attention_mask"].bool()
                for i in range(n):
                    cos = torch.nn.functional.cosine_similarity(states[i][real].double(), states[i + 1][real].double(),
                                                                dim=-1)
                    totals[i] += cos.sum()
                tokens += int(real.sum())
    finally:
        hook.remove()
    return (1 - totals / tokens).tolist()


def keep_most_influential(scores: list[float], keep: int) -> list[int]:
    """The `keep` layer indices of highest influence, in order (of equal scores, the earlier layer is dropped)."""
    ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(ranked[len(scores) - keep :])


def drop_layers(model: Any, keep: list[int]) -> None:
    """Keep only the decoder layers `keep` (in order), renumbering what the KV cache and config index by layer."""
    import torch

    layers = decoder_layers(model)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(kept):
        for module in (layer, getattr(layer, "self_attn", None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = new  # the KV cache stores layer `layer_idx`'s keys and values there
    model.model.layers = kept
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


def accumulate_gradients(model: Any, batches: list[dict[str, Any]]) -> None:
    """Sum ∂L/∂w of the next-token loss (on the completion tokens) over the batches, for Taylor scores."""
    model.zero_grad(set_to_none=True)
    model.eval()  # no dropout: scores of the model as it is
    for batch in batches:
        model(**batch, use_cache=False).loss.backward()


def channel_scores(mlp: Any, importance: str) -> Any:
    """Per intermediate channel: Σw² (or Σ|w·∂L/∂w|) over its gate row, up row and down column."""
    def score(param: Any) -> Any:
        if importance == "taylor" and param.grad is not None:
            return (param.detach() * param.grad).abs()
        return param.detach() ** 2

    total = score(mlp.gate_proj.weight).sum(1) + score(mlp.up_proj.weight).sum(1) + score(mlp.down_proj.weight).sum(0)
    for linear in (mlp.gate_proj, mlp.up_proj):
        if linear.bias is not None:
            total = total + score(linear.bias)
    return total


def prune_mlp(model: Any, ratio: float, importance: str, task: str) -> None:
    """Remove the round(ratio · width) lowest-scoring intermediate channels of every layer's MLP."""
    import torch
    import torch_pruning as tp

    from compressor.models import example_inputs

    layers = decoder_layers(model)
    width = layers[0].mlp.gate_proj.out_features
    k = round(ratio * width)
    if k == 0:
        return
    drops = [channel_scores(layer.mlp, importance).argsort(stable=True)[:k].tolist() for layer in layers]
    model.zero_grad(set_to_none=True)
    # torch-pruning's DependencyGraph traces the Llama forward: gate_proj's outputs couple through SiLU·up to
    # up_proj's outputs and down_proj's inputs. The scores are our own, a plain sum over the three Linears
    # (tp's group importance would normalise each Linear's share first).
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs(model, task),
                                                  forward_fn=lambda m, x: m(**x).logits, verbose=False)
    for layer, drop in zip(layers, drops):
        mlp = layer.mlp
        group = graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=drop)
        touched = {id(dep.target.module) for dep, _ in group if isinstance(dep.target.module, torch.nn.Linear)}
        if touched != {id(mlp.gate_proj), id(mlp.up_proj), id(mlp.down_proj)}:
            raise StepError(f"torch-pruning coupled unexpected modules to {type(mlp).__name__}'s channels")
        group.prune()
        mlp.intermediate_size = mlp.gate_proj.out_features
    model.config.intermediate_size = width - k
