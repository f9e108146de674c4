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
"""

from __future__ import annotations

import functools

import torch
from torch.onnx import symbolic_helper, symbolic_opset11

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


SYMBOLICS = {"aten::rms_norm": rms_norm, "aten::unflatten": unflatten, "aten::squeeze": squeeze}


@functools.cache
def register_symbolics(opset: int) -> None:
    """Make TorchScript exports at `opset` and above use the symbolics above (once per process)."""
    for name, function in SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, function, opset)
