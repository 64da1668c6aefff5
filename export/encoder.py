"""Encoders (classifiers, taggers) to ONNX with `torch.onnx.export`, in the layout Optimum's
`ORTModelFor*` classes and `transformers.pipeline` read: `model.onnx` with inputs `input_ids`,
`attention_mask` (and `token_type_ids` where the tokenizer gives them) and output `logits`, dynamic
`batch_size` and `sequence_length` axes, beside `config.json` and the tokenizer files.

Two exporters: TorchScript (`torch.jit.trace`, the default) and dynamo (`torch.export` + onnxscript);
docs/results.md has the measurement that chose. The model is switched to eager attention, whose
MatMul/Softmax subgraph is the one onnxruntime's BERT attention fusion matches, and is fed the additive
mask below; the TorchScript graph then gets its head counts written in (`name_head_counts`), so that
`optimize-onnx` fuses every layer's attention into one op.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path
from typing import Any

#: The exporters `export-onnx` offers for encoders.
ENCODER_EXPORTERS = ("torchscript", "dynamo")
#: What Optimum names the dynamic axes; ORTModel reads the shapes, and a reader of the graph sees the same names.
AXES = {0: "batch_size", 1: "sequence_length"}


def encoder_inputs(model: Any, tokenizer: Any) -> list[str]:
    """The inputs the exported graph takes: those the tokenizer produces that the model's forward accepts,
    in the order ORTModel feeds them (RoBERTa and DistilBERT take no token_type_ids)."""
    accepted = inspect.signature(model.forward).parameters
    given = set(getattr(tokenizer, "model_input_names", None) or ("input_ids", "attention_mask"))
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted and n in given]


def dummy_inputs(model: Any, names: list[str]) -> tuple[Any, ...]:
    """A batch of two rows, the second padded, so that tracing keeps the attention mask's arithmetic
    (an all-ones mask lets transformers drop the mask, and a trace would bake that in)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(6, int(model.config.vocab_size)), (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(values[n] for n in names)


def logits_module(model: Any) -> Any:
    """A module with the encoder inputs as named parameters that returns the wrapped model's `logits` alone
    (torch.export maps dynamic shapes onto a fixed signature)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=additive_mask(attention_mask), **extra,
                              return_dict=True).logits

    return Logits().eval()


def additive_mask(attention_mask: Any) -> Any:
    """The (batch, 1, length, length) additive mask transformers 4 built for encoders: 0 where a token is
    attended, float32's lowest value where it is padding. transformers 5 uses a 4-D float mask as it is.
    Built here, its Unsqueeze/Expand/Cast/Sub/Cast/Where chain is one that onnxruntime's attention fusion recognises
    and turns into the mask index of its fused Attention op; transformers 5's own mask code traces to a
    Range/And/Where graph that the fusion misses on a traced BERT."""
    import torch

    batch, length = attention_mask.shape
    expanded = attention_mask[:, None, None, :].expand(batch, 1, length, length).to(torch.float32)
    inverted = 1.0 - expanded
    lowest = torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32)
    return torch.where(inverted.to(torch.bool), lowest, inverted)


def prepare_for_export(model: Any) -> Any:
    """The model in eval mode with eager attention (the pattern the fusions match), where it lets us set it."""
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        with contextlib.suppress(Exception):  # a plugin's module may not support switching
            setter("eager")
    return model.eval()


def export_encoder(model: Any, tokenizer: Any, out_file: Path, opset: int, exporter: str,
                   per_token: bool, output: str = "logits") -> list[str]:
    """Write `out_file` from a PyTorch encoder with a task head; returns the graph's input names.
    `per_token`: the logits have a sequence axis (token classification); `output`: the graph's output name
    (the task's `output_name`: `sentence_embedding` for an embedding model, whose head is its pooling)."""
    import torch

    if exporter not in ENCODER_EXPORTERS:
        raise ValueError(f"unknown encoder exporter {exporter!r}; use one of {', '.join(ENCODER_EXPORTERS)}")
    model = prepare_for_export(model)
    names = encoder_inputs(model, tokenizer)
    if names[:2] != ["input_ids", "attention_mask"]:
        raise ValueError(f"an encoder export takes input_ids and attention_mask; this model and tokenizer give {names}")
    wrapped = logits_module(model)
    args = dummy_inputs(model, names)
    axes = {n: AXES for n in names}
    axes[output] = AXES if per_token else {0: "batch_size"}
    quiet = io.StringIO()
    with (torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet),
          contextlib.redirect_stderr(quiet)):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        if exporter == "torchscript":
            torch.onnx.export(wrapped, args, str(out_file), input_names=names, output_names=[output],
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
            import onnx

            graph_model = onnx.load(str(out_file))
            if name_head_counts(graph_model):
                onnx.save_model(graph_model, str(out_file))
        else:
            batch, length = torch.export.Dim("batch_size", min=1), torch.export.Dim("sequence_length", min=1)
            shapes = tuple({0: batch, 1: length} for _ in names)
            program = torch.onnx.export(wrapped, args, input_names=names, output_names=[output],
                                        dynamic_shapes=shapes, opset_version=opset, dynamo=True, optimize=True)
            program.save(str(out_file), external_data=False)
    return names


def name_head_counts(model: Any) -> int:
    """Write each attention projection's head count into the Reshape that splits it into heads.

    transformers 5 splits heads with `view(batch, length, -1, head_dim)`, so the graph's shape is
    Concat(batch, length, -1, head_dim); onnxruntime's attention fusion reads the head count from that
    Concat, and a -1 there leaves it to guess (a pruned layer with fewer heads would not fuse). The count
    is the projection's output width (its MatMul weight's columns) over head_dim. Returns the Reshapes changed."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}  # read by dims; only shape constants are decoded
    producer = {o: n for n in graph.node for o in n.output}

    def constant(name: str) -> Any:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    changed = 0
    for node in list(graph.node):
        concat = producer.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            continue
        heads, head_dim = constant(concat.input[2]), constant(concat.input[3])
        if heads is None or head_dim is None or heads.size != 1 or int(heads.ravel()[0]) != -1 or head_dim.size != 1:
            continue
        width = projection_width(producer.get(node.input[0]), initializers, producer)
        if not width or width % int(head_dim.ravel()[0]):
            continue
        count = np.array([width // int(head_dim.ravel()[0])], dtype=np.int64)
        name = f"{node.name or node.output[0]}/head_count"
        graph.initializer.append(numpy_helper.from_array(count, name))
        concat.input[2] = name
        changed += 1

    return changed


def projection_width(node: Any, initializers: dict[str, Any], producer: dict[str, Any]) -> int | None:
    """The output width of a Linear exported as Add(bias, MatMul(x, W)) or MatMul(x, W): W's columns."""
    if node is not None and node.op_type == "Add":
        node = next((producer[i] for i in node.input if i in producer and producer[i].op_type == "MatMul"), None)
    if node is None or node.op_type != "MatMul":
        return None
    weight = initializers.get(node.input[1])
    return int(weight.dims[1]) if weight is not None and len(weight.dims) == 2 else None
