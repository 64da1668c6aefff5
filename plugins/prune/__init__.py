"""`prune`: structured pruning of BERT-style encoders — attention heads, FFN neurons and whole
layers — uniform across layers, so that the result is an ordinary save_pretrained directory.
Llama-family decoder LLMs (layers dropped by index or block influence, MLP width) are handled
in `decoder.py` beside this module.

FFN neurons are removed through torch-pruning's DependencyGraph (the intermediate Linear's
outputs and everything coupled to them). Attention heads go through transformers'
`prune_heads`, which records them in `config.pruned_heads`: that is what lets the pruned model
reload with `from_pretrained` (BERT derives the head size from hidden_size / num_heads, so a
smaller head count alone could not describe the pruned shapes).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from compressor.models.artifact import Artifact
from compressor.errors import RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.plugins.prune import decoder as prune_decoder
from compressor.step import PlanContext, Step, StepConfig, StepContext

Target = Literal["ffn", "heads"]
LayerChoice = Literal["even", "block-influence"]

#: Model types whose layers sit at `encoder.layer` with BERT's attention and FFN module names.
BERT_STYLE = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie")


class PruneConfig(StepConfig):
    """Settings of `prune`."""

    target: Target | list[Target] = Field(default="ffn", description="What `ratio` prunes: ffn neurons, "
                                                                     "attention heads, or both ([ffn, heads]).")
    ratio: float = Field(default=0.0, ge=0, lt=1, description="Fraction removed in every layer, for each target.")
    ffn_ratio: float | None = Field(default=None, ge=0, lt=1, description="Overrides ratio for FFN neurons.")
    head_ratio: float | None = Field(default=None, ge=0, lt=1, description="Overrides ratio for attention heads.")
    keep_layers: list[int] | None = Field(default=None, min_length=1,
                                          description="Indices of the layers to keep (others are dropped).")
    keep: int | None = Field(default=None, ge=1, description="Keep this many layers, chosen by layer_choice.")
    layer_choice: LayerChoice | None = Field(
        default=None, description="Which layers `keep` keeps: even (evenly spaced, the first and the last "
                                  "included), or block-influence (decoder LLMs: the layers that change their "
                                  "input most on the train rows, ShortGPT). Default: block-influence for "
                                  "decoder LLMs, even otherwise.")
    calibration_rows: int = Field(default=64, ge=1, le=100_000, description="Train rows whose hidden states "
                                                                            "measure block influence.")
    importance: Literal["magnitude", "taylor"] = Field(
        default="magnitude", description="How units are ranked: weight L2 magnitude, or first-order Taylor "
                                         "scores |w·∂L/∂w| on a few batches of the recipe's train data.")
    taylor_batches: int = Field(default=8, ge=1, le=1000, description="Batches used for Taylor scores.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Rows per Taylor or calibration batch.")

    @model_validator(mode="after")
    def _one_layer_rule(self) -> "PruneConfig":
        if self.keep_layers is not None and self.keep is not None:
            raise ValueError("give keep_layers or keep, not both")
        if self.keep_layers is not None and self.layer_choice is not None:
            raise ValueError("layer_choice chooses the layers for keep: N; keep_layers names them itself")
        return self

    def reads_train(self) -> bool:
        """Whether this configuration reads train rows (Taylor scores, or block influence)."""
        taylor = self.importance == "taylor" and any(self.ratios().values())
        return taylor or (self.keep is not None and self.layer_choice == "block-influence")

    def ratios(self) -> dict[str, float]:
        """The ratio per target after overrides."""
        targets = [self.target] if isinstance(self.target, str) else list(self.target)
        ffn = self.ffn_ratio if self.ffn_ratio is not None else (self.ratio if "ffn" in targets else 0.0)
        heads = self.head_ratio if self.head_ratio is not None else (self.ratio if "heads" in targets else 0.0)
        return {"ffn": ffn, "heads": heads}


class Prune(Step):
    """Remove attention heads, FFN neurons and layers of a BERT-style encoder, or layers and MLP channels
    of a Llama-family decoder."""

    name = "prune"
    summary = "Structured pruning (torch-pruning DepGraph): FFN/MLP neurons, attention heads, whole layers."
    version = "2"  # 2: decoder LLMs; Taylor scores keyed on the train data
    Config = PruneConfig
    accepts = ("hf",)
    produces = "hf"

    def data_splits(self, config: StepConfig) -> tuple[str, ...]:
        """Train rows for Taylor scores or block influence; none otherwise."""
        assert isinstance(config, PruneConfig)
        return ("train",) if config.reads_train() else ()

    def supports(self, config: StepConfig, task: Any, model_config: dict[str, Any]) -> str | None:
        """BERT-style encoders, and Llama-family decoders as causal LMs."""
        model_type = model_config.get("model_type")
        if prune_decoder.is_decoder(model_config):
            return prune_decoder.unsupported_task(model_type, task)
        if model_type not in BERT_STYLE:
            return (f"prune supports BERT-style encoders ({', '.join(BERT_STYLE)}) and decoder LLMs "
                    f"({', '.join(prune_decoder.DECODERS)}); this model's model_type is {model_type!r}")
        return None

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """Layer indices, head counts and calibration data are checked against the model's config."""
        assert isinstance(config, PruneConfig)
        mc = ctx.model_config
        n_layers, n_heads = mc.get("num_hidden_layers"), mc.get("num_attention_heads")
        if prune_decoder.is_decoder(mc):
            prune_decoder.check(config, mc, has_train=ctx.data is not None and ctx.data.has("train"))
        elif not isinstance(n_layers, int) or not isinstance(n_heads, int) or "intermediate_size" not in mc:
            raise RecipeError(f"prune supports BERT-style encoders; model_type {mc.get('model_type')!r} has no "
                              "num_hidden_layers / num_attention_heads / intermediate_size", where="uses")
        elif config.layer_choice == "block-influence":
            raise RecipeError("layer_choice block-influence is for decoder LLMs", where="with.layer_choice",
                              hint="use layer_choice: even, or keep_layers: [...]")
        if config.keep_layers is not None:
            bad = [i for i in config.keep_layers if not 0 <= i < n_layers]
            if bad:
                raise RecipeError(f"layer index {bad[0]} is out of range: the model has {n_layers} layers "
                                  f"(0..{n_layers - 1})", where="with.keep_layers")
        if config.keep is not None and config.keep > n_layers:
            raise RecipeError(f"keep {config.keep} is more than the model's {n_layers} layers", where="with.keep")
        ratios = config.ratios()
        if ratios["heads"] and not prune_decoder.is_decoder(mc) and not heads_prunable():
            raise RecipeError("pruning attention heads needs transformers' prune_heads, which transformers 5 "
                              "removed (a head-pruned model could no longer be reloaded)",
                              where="with.head_ratio" if config.head_ratio is not None else "with.target",
                              hint="prune FFN neurons (target: ffn) and whole layers (keep / keep_layers) instead")
        if isinstance(n_heads, int) and round(ratios["heads"] * n_heads) >= n_heads:
            raise RecipeError(f"head ratio {ratios['heads']} would remove all {n_heads} heads", where="with")
        if not any(ratios.values()) and config.keep_layers is None and config.keep is None:
            raise RecipeError("nothing to prune: set ratio (with target), ffn_ratio, head_ratio, keep or keep_layers",
                              where="with")

    def resolve_config(self, config: StepConfig, ctx: PlanContext) -> StepConfig:
        """layer_choice filled in: block-influence for decoder LLMs, even for encoders."""
        assert isinstance(config, PruneConfig)
        if config.layer_choice is not None or config.keep_layers is not None:
            return config
        choice = "block-influence" if prune_decoder.is_decoder(ctx.model_config) else "even"
        return config.model_copy(update={"layer_choice": choice})

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Prune and save; reports parameters and MACs before and after."""
        assert isinstance(config, PruneConfig)
        import torch

        from compressor.models import count_macs_and_params, load_model, save_model

        ctx.seed_everything()
        torch.set_num_threads(ctx.threads)
        model = load_model(artifact)
        macs0, params0 = count_macs_and_params(model, artifact.task)
        if prune_decoder.is_decoder(model.config):
            notes = prune_decoder.prune(model, artifact, config, ctx)
        else:
            notes = _prune_encoder(model, artifact, config, ctx)
        model.zero_grad(set_to_none=True)
        macs1, params1 = count_macs_and_params(model, artifact.task)
        ctx.report(params_before=params0, params_after=params1, macs_before=macs0, macs_after=macs1, **notes)
        return save_model(model, artifact, ctx.out_dir)


def _prune_encoder(model: Any, artifact: Artifact, config: PruneConfig, ctx: StepContext) -> dict[str, Any]:
    """Drop layers, then heads and FFN neurons of a BERT-style encoder, in place; returns what is reported."""
    encoder = _encoder_layers(model)
    keep = prune_decoder.layers_to_keep(config, len(encoder))
    if keep is not None:
        if max(keep) >= len(encoder):
            raise StepError(f"keep_layers index {max(keep)} is out of range for {len(encoder)} layers")
        _drop_layers(model, keep)
    ratios = config.ratios()
    if config.importance == "taylor" and (ratios["ffn"] or ratios["heads"]):
        _accumulate_gradients(model, artifact, config, ctx)
    if ratios["heads"]:
        _prune_heads(model, ratios["heads"], config.importance)
    if ratios["ffn"]:
        _prune_ffn(model, artifact.task, ratios["ffn"], config.importance)
    return {"layers": model.config.num_hidden_layers, "heads_per_layer": _heads_left(model),
            "intermediate_size": model.config.intermediate_size, "importance": config.importance}


def _encoder_layers(model: Any) -> Any:
    base = model.base_model  # the encoder under a task head, or the model itself (BertModel)
    try:
        return base.encoder.layer
    except AttributeError:
        raise StepError(f"prune supports BERT-style encoders (encoder.layer); {type(model).__name__} has none") from None


def heads_prunable() -> bool:
    """Whether the installed transformers can prune heads and reload the result (`prune_heads`, config
    `pruned_heads`): transformers 4 can, transformers 5 removed both."""
    from transformers import PretrainedConfig, PreTrainedModel

    return hasattr(PreTrainedModel, "prune_heads") and "pruned_heads" in PretrainedConfig().to_dict()


def _drop_layers(model: Any, keep: list[int]) -> None:
    import torch

    base = model.base_model
    base.encoder.layer = torch.nn.ModuleList([base.encoder.layer[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    old = getattr(model.config, "pruned_heads", None) or {}
    if old:
        model.config.pruned_heads = {new: old[k] for new, k in enumerate(keep) if k in old}


def _accumulate_gradients(model: Any, artifact: Artifact, config: PruneConfig, ctx: StepContext) -> None:
    """Sum ∂L/∂w over a few training batches (for Taylor importance)."""
    import random

    from compressor.models.data import all_labels, label_ids
    from compressor.models.loading import load_tokenizer
    from compressor.models.training import collate

    rows = ctx.data.load("train")
    rows = random.Random(ctx.seed).sample(rows, min(len(rows), config.taylor_batches * config.batch_size))
    mapping = label_ids(artifact.labels, all_labels(rows))
    tokenizer = load_tokenizer(artifact.path)
    model.zero_grad(set_to_none=True)
    model.eval()  # no dropout: scores of the model as it is
    for i in range(0, len(rows), config.batch_size):
        batch = collate(tokenizer, rows[i : i + config.batch_size], artifact.task, mapping, artifact.max_length)
        model(**batch).loss.backward()


def _score(weight: Any, importance: str) -> Any:
    """Per-element score: squared weight, or |w·grad| for Taylor."""
    if importance == "taylor" and weight.grad is not None:
        return (weight.detach() * weight.grad).abs()
    return weight.detach() ** 2


def _heads_left(model: Any) -> int:
    return _encoder_layers(model)[0].attention.self.num_attention_heads


def _prune_heads(model: Any, ratio: float, importance: str) -> None:
    """Remove the same number of lowest-scoring heads in every layer (transformers' prune_heads)."""
    plan = {}
    for index, layer in enumerate(_encoder_layers(model)):
        attn = layer.attention
        n, size = attn.self.num_attention_heads, attn.self.attention_head_size
        k = round(ratio * n)
        if k == 0:
            continue
        rows = sum(_score(m.weight, importance).sum(1) for m in (attn.self.query, attn.self.key, attn.self.value))
        cols = _score(attn.output.dense.weight, importance).sum(0)
        per_head = (rows + cols).view(n, size).sum(1)
        # prune_heads takes indices among the heads the layer had originally
        alive = [h for h in range(n + len(attn.pruned_heads)) if h not in attn.pruned_heads]
        plan[index] = sorted(alive[h] for h in per_head.argsort()[:k].tolist())
    if plan:
        model.prune_heads(plan)


def _prune_ffn(model: Any, task: str, ratio: float, importance: str) -> None:
    """Remove the same number of FFN neurons in every layer through torch-pruning's DependencyGraph."""
    import torch_pruning as tp

    from compressor.models import example_inputs

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs(model, task),
                                                  forward_fn=lambda m, x: m(**x).logits, verbose=False)
    scorer = (tp.importance.GroupTaylorImportance() if importance == "taylor"
              else tp.importance.GroupMagnitudeImportance(p=2))
    new_size = None
    for layer in _encoder_layers(model):
        dense = layer.intermediate.dense
        n = dense.out_features
        k = round(ratio * n)
        if k == 0:
            return
        group = graph.get_pruning_group(dense, tp.prune_linear_out_channels, idxs=list(range(n)))
        scores = scorer(group)
        if scores is None:  # Taylor without gradients: fall back to magnitude
            scores = tp.importance.GroupMagnitudeImportance(p=2)(group)
        drop = scores.argsort()[:k].tolist()
        graph.get_pruning_group(dense, tp.prune_linear_out_channels, idxs=drop).prune()
        new_size = dense.out_features
    model.config.intermediate_size = new_size


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `prune` step."""
    register(Prune)
