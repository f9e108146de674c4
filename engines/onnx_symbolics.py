"""TorchScript-exporter symbolics for ops that diffusers' transformers use and opset 17 exports badly.

Registered with torch's exporter once, on memscan's first export (`register_symbolics`), for the
rest of the process: torch cannot take an override back for an op it has no symbolic of its own
for (its registry is left empty and every later lookup fails). Each gives what torch's own gives
wherever that one works, so other exports only change by succeeding; the SD 1.x/2.x, SDXL and
SD3 graphs come out node for node the same.

- `aten::rms_norm` (`torch.nn.RMSNorm`, Flux's query/key norms) has no symbolic before opset 23.
- `aten::unflatten`'s symbolic computes its split position with graph ops, which hides the
  output shape from the exporter's shape inference; the exporter then keeps the traced shape,
  batch 2 included, and the `reshape(*x.shape[:-1], ...)` that follows in Flux's rotary
  embedding is frozen at batch 2.
- `aten::squeeze(dim)` becomes an ONNX `If` where shape inference lost the dimension's size
  (PixArt's `hidden_states.squeeze(1)` after its patch embedding), and ONNX Runtime, which
  knows the size, rejects the `If`'s squeeze branch. The traced size decides instead.
- `aten::scaled_dot_product_attention` is torch's own symbolic (MatMul, Softmax, MatMul on
  `[B, H, S, D]`, with the heads' transposes around it), except inside `fused_attention()`:
  there it becomes one attention node on `[B, S, H * D]` (`memscan::Attention`, ONNX's opset-23
  `Attention` once `standard_attention` has rewritten the file). On ONNX Runtime's CPU that node
  keeps each head's scores in cache, and the transposes it takes cancel the callers' own.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.onnx import symbolic_helper, symbolic_opset11, symbolic_opset14

FLOAT = 1  # ONNX TensorProto.FLOAT


def _constant(g, values: list[int]):
    return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))


@symbolic_helper.parse_args("v", "is", "v", "f")
def rms_norm(g, x, normalized_shape: list[int], weight, eps: float | None):
    """`x / sqrt(mean(x^2) + eps) * weight` over the last dims, in fp32 as torch computes it."""
    eps = torch.finfo(torch.float32).eps if eps is None else eps  # torch's default for fp32 math
    upcast = g.op("Cast", x, to_i=FLOAT)
    # Up to opset 17 ReduceMean takes its axes as an attribute.
    mean = g.op("ReduceMean", g.op("Mul", upcast, upcast), axes_i=list(range(-len(normalized_shape), 0)), keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
    out = g.op("CastLike", g.op("Div", upcast, rms), x)
    return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)


@symbolic_helper.parse_args("v", "i", "is")
def unflatten(g, x, dim: int, sizes: list[int]):
    """`x` with dimension `dim` split into `sizes`, the head and tail of its shape sliced at constant positions."""
    rank = symbolic_helper._get_tensor_rank(x)
    if rank is None:  # as torch's own symbolic does
        return symbolic_helper._unimplemented("unflatten", "the input's rank is unknown", x)
    dim %= rank
    shape = g.op("Shape", x)
    head = g.op("Slice", shape, _constant(g, [0]), _constant(g, [dim]))
    tail = g.op("Slice", shape, _constant(g, [dim + 1]), _constant(g, [rank]))
    return g.op("Reshape", x, g.op("Concat", head, _constant(g, sizes), tail, axis_i=0))


def squeeze(g, x, dim=None):
    """torch's squeeze, except that a dimension of unknown size that was not 1 in the trace is kept as it is."""
    if dim is not None and symbolic_helper._is_constant(dim):
        index = symbolic_helper._get_const(dim, "i", "dim")
        traced = g.original_node.inputsAt(0).type().sizes()  # the example's sizes, batch 2
        if symbolic_helper._get_tensor_dim_size(x, index) is None and traced is not None and traced[index] != 1:
            return x
    return symbolic_opset11.squeeze(g, x, dim)


ATTENTION_DOMAIN = "memscan"  # the fused node's domain until `standard_attention` makes it ONNX's own
ATTENTION_OPSET = 23  # ONNX's first opset with `Attention`
_fused_attention = contextvars.ContextVar("fused_attention", default=False)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Export attention as one fused node while inside (then run `standard_attention` on the file)."""
    token = _fused_attention.set(True)
    try:
        yield
    finally:
        _fused_attention.reset(token)


def scaled_dot_product_attention(g, query, key, value, attn_mask, dropout_p, is_causal, scale, *enable_gqa):
    """torch's symbolic, or inside `fused_attention()` one `memscan::Attention` node on `[B, S, H * D]` rows.

    The arguments are the exporter's values, passed to torch's symbolic as they came (torch before 2.5
    has no `enable_gqa`)."""
    fused = _fusable(g, attn_mask, dropout_p, is_causal, scale, enable_gqa) if _fused_attention.get() else None
    if fused is None:
        return symbolic_opset14.scaled_dot_product_attention(
            g, query, key, value, attn_mask, dropout_p, is_causal, scale, *enable_gqa
        )
    heads, length, kv_length, value_size, causal, scale_value = fused
    rows = _constant(g, [0, 0, -1])  # [B, S, H, D] -> [B, S, H * D]
    q, k, v = (g.op("Reshape", g.op("Transpose", x, perm_i=[0, 2, 1, 3]), rows) for x in (query, key, value))
    attributes = {"q_num_heads_i": heads, "kv_num_heads_i": heads, "is_causal_i": int(causal)}
    if scale_value is not None:
        attributes["scale_f"] = scale_value
    masks = [] if symbolic_helper._is_none(attn_mask) else [_mask_rows(g, attn_mask, length, kv_length)]
    out = g.op(f"{ATTENTION_DOMAIN}::Attention", q, k, v, *masks, **attributes)
    out = g.op("Reshape", out, _constant(g, [0, 0, heads, value_size]))
    return g.op("Transpose", out, perm_i=[0, 2, 1, 3])


def _fusable(g, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple | None:
    """(heads, query length, key length, value head size, causal, scale or None) where ONNX Runtime's fused kernel
    computes what torch does; else None."""
    constants = [symbolic_helper._maybe_get_const(x, kind) for x, kind in ((dropout_p, "f"), (is_causal, "b"))]
    gqa = [symbolic_helper._maybe_get_const(x, "b") for x in enable_gqa]
    scale_value = None if symbolic_helper._is_none(scale) else symbolic_helper._maybe_get_const(scale, "f")
    if any(isinstance(x, torch._C.Value) for x in (*constants, *gqa, scale_value)):
        return None  # computed in the graph: torch's symbolic handles it
    dropout, causal = float(constants[0]), bool(constants[1])
    if dropout or any(gqa):
        return None
    # The traced example's sizes: heads, lengths and head sizes are the model's, not the batch's.
    sizes = [g.original_node.inputsAt(i).type().sizes() for i in range(3)]
    if not all(s is not None and len(s) == 4 for s in sizes):
        return None
    (batch, heads, length, _), (kv_batch, kv_heads, kv_length, _), (v_batch, _, _, value_size) = sizes
    # ONNX Runtime's kernel takes no batch broadcast, and causal attention only where both lengths agree.
    if not (batch == kv_batch == v_batch and heads == kv_heads and (not causal or length == kv_length)):
        return None
    if not symbolic_helper._is_none(attn_mask):
        mask = g.original_node.inputsAt(3).type().sizes()
        if mask is None or len(mask) < 2 or mask[-1] != kv_length:  # nor a mask broadcast over the keys
            return None
    return heads, length, kv_length, value_size, causal, None if scale_value is None else float(scale_value)


def _mask_rows(g, mask, length: int, kv_length: int):
    """`mask` broadcast over the queries: ONNX Runtime's `Attention` takes a mask of one row per query only."""
    sizes = g.original_node.inputsAt(3).type().sizes()
    if sizes[-2] == length:
        return mask
    return g.op("Expand", mask, _constant(g, [1] * (len(sizes) - 2) + [length, kv_length]))


def standard_attention(path: Path) -> None:
    """Rewrite the ONNX file at `path` (weights left where they are) to opset 23, its fused attention nodes made
    ONNX's own `Attention`; a file without any is left alone."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path), load_external_data=False)
    if not any(node.domain == ATTENTION_DOMAIN for node in model.graph.node):
        return
    model = version_converter.convert_version(model, ATTENTION_OPSET)
    for node in model.graph.node:
        if node.domain == ATTENTION_DOMAIN:
            node.domain = ""
    imports = [o for o in model.opset_import if o.domain != ATTENTION_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    # The exporter left the fused nodes' outputs, and what it computed from them, untyped; ONNX Runtime infers them.
    kept = [info for info in model.graph.value_info if info.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    onnx.save(model, str(path))


SYMBOLICS = {
    "aten::rms_norm": rms_norm,
    "aten::unflatten": unflatten,
    "aten::squeeze": squeeze,
    "aten::scaled_dot_product_attention": scaled_dot_product_attention,
}


@functools.cache
def register_symbolics(opset: int) -> None:
    """Make TorchScript exports at `opset` and above use the symbolics above (once per process)."""
    for name, function in SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, function, opset)
