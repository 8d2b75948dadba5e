"""FX (aten) → expression IR, conservatively.

``Extractor.express(node, index)`` answers "what is element ``index`` of this
node's value?" as an :class:`~.expr.Expr`, walking back through elementwise
maths, broadcasting, views, ``arange``, ``tril``/``triu``, indexing and
embeddings.  Anything it does not understand is handled one of two ways:

- the node does not depend on the attention scores: it becomes a *captured
  tensor* (a ``Load`` from the node's value, passed to the kernel at run time).
  This is always sound; it only costs the sparsity the kernel could have found.
- the node depends on the scores: extraction fails with a reason naming the
  node, and the site is left to stock Inductor.

Dtypes follow eager except that fp16/bf16 arithmetic is carried out in fp32
(the kernel's precision); see docs/numerics.md.
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

import torch
import torch.fx as fx

from . import expr as E
from .expr import Expr

aten = torch.ops.aten


class ExtractionError(Exception):
    def __init__(self, reason: str, node: fx.Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


def node_val(n) -> object:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def node_shape(n) -> tuple[int, ...]:
    v = node_val(n)
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    return ()


def node_dtype(n) -> str:
    v = node_val(n)
    if isinstance(v, torch.Tensor):
        return E.dtype_name(v.dtype)
    if isinstance(v, (bool, torch.SymBool)):
        return E.BOOL
    if isinstance(v, (int, torch.SymInt)):
        return E.INT64
    return "float32"


def compute_dtype(dtype: str) -> str:
    """Half-precision arithmetic is carried out in fp32 (Note [mod precision])."""
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _ops(*names: str) -> set:
    out = set()
    for name in names:
        packet_name, _, overload = name.partition(".")
        packet = getattr(aten, packet_name, None)
        if packet is None:
            continue
        if overload:
            op = getattr(packet, overload, None)
            if op is not None:
                out.add(op)
        else:
            for ov in packet.overloads():
                out.add(getattr(packet, ov))
    return out


BINARY = {
    "add": _ops("add", "add_"), "sub": _ops("sub", "sub_"), "mul": _ops("mul", "mul_"),
    "truediv": _ops("div.Tensor", "div.Scalar", "div_.Tensor", "div_.Scalar", "true_divide"),
    "floordiv": _ops("floor_divide", "floor_divide_"), "remainder": _ops("remainder", "remainder_"),
    "pow": _ops("pow", "pow_"), "maximum": _ops("maximum", "fmax", "max.other"),
    "minimum": _ops("minimum", "fmin", "min.other"),
    "eq": _ops("eq"), "ne": _ops("ne"), "lt": _ops("lt"), "le": _ops("le"), "gt": _ops("gt"), "ge": _ops("ge"),
    "and": _ops("logical_and", "bitwise_and", "__and__"), "or": _ops("logical_or", "bitwise_or", "__or__"),
    "xor": _ops("logical_xor", "bitwise_xor", "__xor__"),
}
UNARY = {
    name: _ops(name, name + "_")
    for name in ("neg", "abs", "exp", "exp2", "log", "log2", "log1p", "expm1", "tanh", "sqrt", "rsqrt",
                 "sigmoid", "sin", "cos", "floor", "ceil", "trunc", "sign", "erf", "reciprocal")
}
UNARY["not"] = _ops("logical_not", "bitwise_not", "logical_not_", "bitwise_not_")
UNARY["round"] = _ops("round.default", "round_.default")
IDENTITY = _ops("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "lift_fresh", "_conj")
CASTS = _ops("to.dtype", "to.dtype_layout", "to.device", "to.other", "_to_copy", "type_as", "_to_copy.default")
VIEW_LIKE = _ops("view", "reshape", "_unsafe_view", "view_copy", "_reshape_alias")
CREATE_FULL = _ops("full", "full_like", "ones", "ones_like", "zeros", "zeros_like", "new_ones", "new_zeros",
                   "new_full", "scalar_tensor", "new_empty_strided")
INPLACE_ARITH = _ops("add_", "sub_", "mul_", "div_", "clamp_", "clamp_min_", "clamp_max_", "masked_fill_",
                     "floor_divide_", "remainder_", "neg_", "abs_", "tanh_", "exp_", "log_", "pow_",
                     "logical_not_", "bitwise_not_", "round_", "floor_", "ceil_", "trunc_", "sigmoid_")

MATMULS = _ops("matmul", "bmm", "mm", "einsum", "baddbmm")


class Extractor:
    """Express graph values as IR, elementwise, in the index space of the scores.

    ``score_node`` is the Q·Kᵀ node; its element at the canonical index is
    ``E.score`` (raw product, scale 1) — any other index means the scores were
    re-laid-out on the way to softmax, which is refused.
    """

    def __init__(self, graph_module: fx.GraphModule, score_node: fx.Node, score_index: Sequence[Expr],
                 score_value: Expr | None = None, index_ranges: dict | None = None):
        self.gm = graph_module
        self.score_node = score_node
        self.score_index = tuple(score_index)
        self.score_value = score_value if score_value is not None else E.score
        self.captured: list[fx.Node] = []
        self._memo: dict = {}
        self._order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
        self.score_dependent = self._descendants(score_node)
        shape = node_shape(score_node)
        self.index_ranges = index_ranges if index_ranges is not None else {
            ix.name: (0, n - 1) for ix, n in zip(self.score_index, shape) if isinstance(ix, E.Index)}

    # -- helpers -------------------------------------------------------------
    def _descendants(self, root: fx.Node) -> set[fx.Node]:
        out, stack = set(), [root]
        while stack:
            n = stack.pop()
            if n in out:
                continue
            out.add(n)
            stack.extend(n.users)
        return out

    def capture(self, node: fx.Node, index: Sequence[Expr]) -> Expr:
        if node in self.score_dependent:
            raise ExtractionError(f"cannot express `{_describe(node)}` (it depends on the scores)", node)
        shape = node_shape(node)
        if len(shape) != len(index):
            raise ExtractionError(f"index rank mismatch at `{node.name}`", node)
        # a real 0-d constant is folded into the expression
        if node.op == "get_attr" and len(shape) == 0:
            real = _get_attr(self.gm, node.target)
            if isinstance(real, torch.Tensor) and real.numel() == 1:
                val = real.item()
                if not (isinstance(val, float) and math.isnan(val)):
                    return E.const(val, compute_dtype(E.dtype_name(real.dtype)))
        if node not in self.captured:
            self.captured.append(node)
        idx = tuple(E.const(0, E.INT64) if s == 1 else i for s, i in zip(shape, index))
        return E.Load(self.captured.index(node), idx, node_dtype(node))

    def operand(self, arg, out_index: Sequence[Expr], out_shape: Sequence[int], dtype_hint: str) -> Expr:
        """An argument broadcast to the output: python scalars become constants."""
        if isinstance(arg, fx.Node):
            shape = node_shape(arg)
            r, R = len(shape), len(out_shape)
            if r > R:
                raise ExtractionError(f"operand `{arg.name}` has more dims than its result", arg)
            idx = []
            for i, s in enumerate(shape):
                j = i + R - r
                idx.append(E.const(0, E.INT64) if s == 1 else out_index[j])
            return self.express(arg, tuple(idx))
        if isinstance(arg, bool):
            return E.const(arg, E.BOOL)
        if isinstance(arg, int):
            return E.const(arg, E.INT64 if not E.is_float(dtype_hint) else dtype_hint)
        if isinstance(arg, float):
            if math.isnan(arg):
                raise ExtractionError("NaN constant in the scores")
            return E.const(arg, dtype_hint if E.is_float(dtype_hint) else "float32")
        raise ExtractionError(f"unsupported operand {arg!r}")

    # -- main entry ----------------------------------------------------------
    def express(self, node: fx.Node, index: Sequence[Expr]) -> Expr:
        index = tuple(index)
        key = (node, index)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        out = self._express(node, index)
        self._memo[key] = out
        return out

    def _express(self, node: fx.Node, index: tuple[Expr, ...]) -> Expr:
        if node is self.score_node:
            size_one = [n == 1 for n in node_shape(node)]
            if any(i != s and not one for i, s, one in zip(index, self.score_index, size_one)):
                raise ExtractionError("the scores are re-laid-out between Q·Kᵀ and softmax", node)
            return self.score_value
        if node.op != "call_function":
            return self.capture(node, index)
        t = node.target
        args, kwargs = node.args, node.kwargs
        shape = node_shape(node)
        out_dtype = node_dtype(node)
        cdt = compute_dtype(out_dtype)
        try:
            if t in INPLACE_ARITH:
                self._check_inplace_is_last_use(node)
            for name, ops in BINARY.items():
                if t in ops:
                    return self._binary(name, node, index, shape, cdt)
            for name, ops in UNARY.items():
                if t in ops:
                    x = self.operand(args[0], index, shape, cdt)
                    if name == "round" and len(args) > 1:
                        raise ExtractionError("round with decimals", node)
                    return E.call(name, x, dtype=cdt if name != "not" else E.BOOL)
            if t in IDENTITY:
                return self.express(args[0], index)
            if t in (aten.dropout.default,):
                if args[2] if len(args) > 2 else kwargs.get("train", False):
                    raise ExtractionError("dropout in training on the scores", node)
                return self.express(args[0], index)
            if t in CASTS:
                x = self.operand(args[0], index, shape, cdt)
                return self._cast(x, cdt)
            if t in _ops("rsub"):
                alpha = args[2] if len(args) > 2 else kwargs.get("alpha", 1)
                a = self.operand(args[0], index, shape, cdt)
                b_ = self.operand(args[1], index, shape, cdt)
                if alpha != 1:
                    b_ = E.call("mul", b_, E.const(alpha, cdt), dtype=cdt)
                return E.call("sub", self._cast(b_, cdt), self._cast(a, cdt), dtype=cdt)
            if t in _ops("where"):
                c = self.operand(args[0], index, shape, E.BOOL)
                x = self.operand(args[1], index, shape, cdt)
                y = self.operand(args[2], index, shape, cdt)
                return E.call("where", self._cast(c, E.BOOL), self._cast(x, cdt), self._cast(y, cdt), dtype=cdt)
            if t in _ops("masked_fill", "masked_fill_"):
                x = self.operand(args[0], index, shape, cdt)
                m = self.operand(args[1], index, shape, E.BOOL)
                v = self.operand(args[2], index, shape, cdt)
                return E.call("where", self._cast(m, E.BOOL), self._cast(v, cdt), self._cast(x, cdt), dtype=cdt)
            if t in _ops("clamp", "clamp_", "clamp_min", "clamp_max", "clamp_min_", "clamp_max_"):
                return self._clamp(node, index, shape, cdt)
            if t in _ops("div.Tensor_mode", "div.Scalar_mode", "div_.Tensor_mode", "div_.Scalar_mode"):
                mode = kwargs.get("rounding_mode", args[2] if len(args) > 2 else None)
                a = self._cast(self.operand(args[0], index, shape, cdt), cdt)
                b_ = self._cast(self.operand(args[1], index, shape, cdt), cdt)
                if mode == "floor":
                    return E.call("floordiv", a, b_, dtype=cdt)
                if mode == "trunc":
                    if E.is_float(cdt):
                        return E.call("trunc", E.call("truediv", a, b_, dtype=cdt), dtype=cdt)
                    raise ExtractionError("integer division with rounding_mode='trunc'", node)
                return E.call("truediv", a, b_, dtype=cdt)
            if t in VIEW_LIKE:
                return self._reshape(node, index)
            if t in _ops("unsqueeze", "unsqueeze_copy"):
                d = _norm_dim(args[1], len(shape))
                return self.express(args[0], index[:d] + index[d + 1:])
            if t in _ops("squeeze", "squeeze_copy"):
                in_shape = node_shape(args[0])
                dims = args[1] if len(args) > 1 else [i for i, s in enumerate(in_shape) if s == 1]
                dims = [dims] if isinstance(dims, int) else list(dims)
                dims = {_norm_dim(d, len(in_shape)) for d in dims if in_shape[_norm_dim(d, len(in_shape))] == 1}
                it = iter(index)
                idx = tuple(E.const(0, E.INT64) if i in dims else next(it) for i in range(len(in_shape)))
                return self.express(args[0], idx)
            if t in _ops("expand", "expand_copy", "expand_as", "broadcast_to"):
                in_shape = node_shape(args[0])
                R, r = len(shape), len(in_shape)
                idx = tuple(E.const(0, E.INT64) if in_shape[i] == 1 and shape[i + R - r] != 1 else index[i + R - r]
                            for i in range(r))
                return self.express(args[0], idx)
            if t in _ops("permute", "permute_copy"):
                perm = [_norm_dim(p, len(shape)) for p in args[1]]
                idx = [None] * len(perm)
                for out_d, in_d in enumerate(perm):
                    idx[in_d] = index[out_d]
                return self.express(args[0], tuple(idx))
            if t in _ops("transpose", "transpose_copy", "swapaxes", "swapdims"):
                d0, d1 = _norm_dim(args[1], len(shape)), _norm_dim(args[2], len(shape))
                idx = list(index)
                idx[d0], idx[d1] = idx[d1], idx[d0]
                return self.express(args[0], tuple(idx))
            if t in _ops("t", "numpy_T", "mT", "permute.default") and len(shape) >= 2:
                idx = list(index)
                idx[-1], idx[-2] = idx[-2], idx[-1]
                return self.express(args[0], tuple(idx))
            if t in _ops("slice", "slice_copy"):
                return self._slice(node, index)
            if t in _ops("narrow"):
                dim = _norm_dim(args[1], len(shape))
                idx = list(index)
                idx[dim] = E.call("add", idx[dim], E.const(int(args[2]), E.INT64), dtype=E.INT64)
                return self.express(args[0], tuple(idx))
            if t in _ops("select", "select_copy"):
                in_shape = node_shape(args[0])
                dim = _norm_dim(args[1], len(in_shape))
                i = int(args[2])
                i = i + in_shape[dim] if i < 0 else i
                return self.express(args[0], index[:dim] + (E.const(i, E.INT64),) + index[dim:])
            if t in _ops("arange"):
                return self._arange(node, index, out_dtype)
            if t in CREATE_FULL:
                return self._full(node, out_dtype)
            if t in _ops("tril", "triu", "tril_", "triu_"):
                diag = args[1] if len(args) > 1 else kwargs.get("diagonal", 0)
                x = self.express(args[0], index)
                i, j = index[-2], index[-1]
                d = E.call("sub", j, i, dtype=E.INT64)
                # a diagonal computed from a size (symbolic under dynamic shapes) is read at run time
                diag = self.express(diag, ()) if isinstance(diag, fx.Node) else E.const(int(diag), E.INT64)
                keep = E.call("le" if "tril" in str(t) else "ge", d, diag, dtype=E.BOOL)
                return E.call("where", keep, x, E.const(0, x.dtype), dtype=x.dtype)
            if t in _ops("embedding"):
                weight, ids = args[0], args[1]
                id_expr = self.express(ids, index[:-1])
                if node in self.score_dependent or weight in self.score_dependent:
                    raise ExtractionError("embedding of score-dependent values", node)
                w = self.capture(weight, (id_expr, index[-1]))
                return w
            if t in _ops("index.Tensor", "_unsafe_index.Tensor"):
                return self._index(node, index)
            if t in _ops("repeat"):
                in_shape = node_shape(args[0])
                R, r = len(shape), len(in_shape)
                idx = tuple(index[i + R - r] if in_shape[i] == shape[i + R - r]
                            else E.call("remainder", index[i + R - r], E.const(in_shape[i], E.INT64), dtype=E.INT64)
                            for i in range(r))
                return self.express(args[0], idx)
            if t is operator.getitem:
                return self.capture(node, index)
        except ExtractionError as exc:
            if exc.node is None:
                exc.node = node
            if node in self.score_dependent:
                raise
            return self.capture(node, index)
        # unknown op
        if node in self.score_dependent:
            raise ExtractionError(f"unsupported op `{_describe(node)}` between Q·Kᵀ and softmax", node)
        return self.capture(node, index)

    # -- op families ---------------------------------------------------------
    def _cast(self, x: Expr, dtype: str) -> Expr:
        if dtype == E.BOOL and x.dtype != E.BOOL:
            return E.call("ne", x, E.const(0, x.dtype), dtype=E.BOOL)
        if E.is_int(dtype) and E.is_float(x.dtype):
            return E.call("trunc_to", x, dtype=dtype)
        return E.call("to", x, dtype=dtype)

    def _binary(self, name: str, node: fx.Node, index, shape, cdt) -> Expr:
        args, kwargs = node.args, node.kwargs
        logical = name in ("and", "or", "xor")
        compare = name in E.COMPARISONS
        if compare:
            # compare in the promoted dtype of the operands (ints stay ints)
            da = node_dtype(args[0]) if isinstance(args[0], fx.Node) else None
            db = node_dtype(args[1]) if isinstance(args[1], fx.Node) else None
            operand_dtype = _promote(da, db, args)
            a = self._cast(self.operand(args[0], index, shape, operand_dtype), compute_dtype(operand_dtype))
            b_ = self._cast(self.operand(args[1], index, shape, operand_dtype), compute_dtype(operand_dtype))
            return E.call(name, a, b_, dtype=E.BOOL)
        if logical:
            if cdt != E.BOOL and name != "and" and not E.is_int(cdt):
                raise ExtractionError(f"bitwise {name} on {cdt}", node)
            if cdt != E.BOOL:
                raise ExtractionError(f"bitwise {name} on integers", node)
            a = self._cast(self.operand(args[0], index, shape, E.BOOL), E.BOOL)
            b_ = self._cast(self.operand(args[1], index, shape, E.BOOL), E.BOOL)
            return E.call(name, a, b_, dtype=E.BOOL)
        a = self._cast(self.operand(args[0], index, shape, cdt), cdt)
        b_ = self._cast(self.operand(args[1], index, shape, cdt), cdt)
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 and name in ("add", "sub") else 1)
        if name in ("add", "sub") and alpha != 1:
            b_ = E.call("mul", b_, E.const(alpha, cdt), dtype=cdt)
        if name == "truediv" and not E.is_float(cdt):
            raise ExtractionError("true division producing integers", node)
        return E.call(name, a, b_, dtype=cdt)

    def _clamp(self, node, index, shape, cdt) -> Expr:
        t, args, kwargs = node.target, node.args, node.kwargs
        x = self._cast(self.operand(args[0], index, shape, cdt), cdt)
        name = str(t)
        if "clamp_min" in name:
            lo, hi = args[1], None
        elif "clamp_max" in name:
            lo, hi = None, args[1]
        else:
            lo = args[1] if len(args) > 1 else kwargs.get("min")
            hi = args[2] if len(args) > 2 else kwargs.get("max")
        if lo is not None:
            x = E.call("maximum", x, self._cast(self.operand(lo, index, shape, cdt), cdt), dtype=cdt)
        if hi is not None:
            x = E.call("minimum", x, self._cast(self.operand(hi, index, shape, cdt), cdt), dtype=cdt)
        return x

    def _reshape(self, node: fx.Node, index) -> Expr:
        src = node.args[0]
        in_shape, out_shape = node_shape(src), node_shape(node)
        return self.express(src, reshape_index(in_shape, out_shape, index))

    def _slice(self, node: fx.Node, index) -> Expr:
        args, kwargs = node.args, node.kwargs
        in_shape = node_shape(args[0])
        dim = _norm_dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(in_shape))
        start = args[2] if len(args) > 2 else kwargs.get("start", None)
        step = args[4] if len(args) > 4 else kwargs.get("step", 1)
        idx = list(index)
        i = idx[dim]
        if step != 1:
            i = E.call("mul", i, E.const(int(step), E.INT64), dtype=E.INT64)
        if isinstance(start, fx.Node):  # a start computed from a size: resolved as eager does, at run time
            s, size = self.express(start, ()), E.const(in_shape[dim], E.INT64)
            zero = E.const(0, E.INT64)
            wrapped = E.call("maximum", E.call("add", s, size, dtype=E.INT64), zero, dtype=E.INT64)
            start_expr = E.call("where", E.call("lt", s, zero, dtype=E.BOOL), wrapped,
                                E.call("minimum", s, size, dtype=E.INT64), dtype=E.INT64)
            idx[dim] = E.call("add", i, start_expr, dtype=E.INT64)
            return self.express(args[0], tuple(idx))
        start = 0 if start is None else int(start)
        if start < 0:
            start = max(start + in_shape[dim], 0)
        start = min(start, in_shape[dim])
        if start:
            i = E.call("add", i, E.const(start, E.INT64), dtype=E.INT64)
        idx[dim] = i
        return self.express(args[0], tuple(idx))

    def _arange(self, node: fx.Node, index, out_dtype: str) -> Expr:
        args = [a for a in node.args]
        if node.target == aten.arange.default:
            start, step = 0, 1
        elif node.target == aten.arange.start:
            start, step = args[0], 1
        else:
            start = args[0]
            step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
        (i,) = index
        cdt = compute_dtype(out_dtype)
        if E.is_float(cdt):
            x = E.call("to", i, dtype=cdt)
            val = E.call("add", E.call("mul", x, E.const(step, cdt), dtype=cdt), E.const(start, cdt), dtype=cdt)
            return val
        x = i if cdt == E.INT64 else E.call("to", i, dtype=cdt)
        if step != 1:
            x = E.call("mul", x, E.const(int(step), cdt), dtype=cdt)
        if start:
            x = E.call("add", x, E.const(int(start), cdt), dtype=cdt)
        return x

    def _full(self, node: fx.Node, out_dtype: str) -> Expr:
        t, args, kwargs = node.target, node.args, node.kwargs
        name = str(t)
        if "zeros" in name:
            v = 0
        elif "ones" in name:
            v = 1
        elif "scalar_tensor" in name:
            v = args[0]
        elif "new_full" in name or "full_like" in name:
            v = args[2] if "new_full" in name and len(args) > 2 else args[1]
            if "new_full" in name:
                v = args[2] if len(args) > 2 else kwargs["fill_value"]
        elif name.startswith("aten.full"):
            v = args[1] if len(args) > 1 else kwargs["fill_value"]
        else:
            raise ExtractionError(f"unsupported constructor {name}", node)
        if isinstance(v, fx.Node):
            raise ExtractionError("fill value computed at run time", node)
        if isinstance(v, float) and math.isnan(v):
            raise ExtractionError("NaN fill", node)
        return E.const(v, compute_dtype(out_dtype))

    def _index(self, node: fx.Node, index) -> Expr:
        src, idx_nodes = node.args[0], list(node.args[1])
        in_shape, out_shape = node_shape(src), node_shape(node)
        positions = [i for i, n in enumerate(idx_nodes) if n is not None]
        if not positions:
            return self.express(src, index)
        if positions != list(range(positions[0], positions[-1] + 1)):
            raise ExtractionError("advanced indexing with separated index tensors", node)
        bshape = torch.broadcast_shapes(*[node_shape(idx_nodes[p]) for p in positions])
        first = positions[0]
        nb = len(bshape)
        # result dims: src[:first] + bshape + src[last+1:]
        before = index[:first]
        bidx = index[first:first + nb]
        after = index[first + nb:]
        src_idx = list(before)
        for p in positions:
            n = idx_nodes[p]
            v = self.operand(n, bidx, bshape, E.INT64)
            if v.dtype == E.BOOL:
                raise ExtractionError("boolean mask indexing", node)
            size = in_shape[p]
            # negative indices wrap, as eager does
            rng = E.int_range(v, self.index_ranges)
            if rng is not None and rng[1] < 0:
                v = E.call("add", v, E.const(size, v.dtype), dtype=v.dtype)
            elif rng is None or rng[0] < 0:
                v = E.call("where", E.call("lt", v, E.const(0, v.dtype), dtype=E.BOOL),
                           E.call("add", v, E.const(size, v.dtype), dtype=v.dtype), v, dtype=v.dtype)
            src_idx.append(v)
        src_idx.extend(after)
        if len(src_idx) != len(in_shape) or len(index) != len(out_shape):
            raise ExtractionError("indexing shape bookkeeping failed", node)
        return self.express(src, tuple(src_idx))

    def _check_inplace_is_last_use(self, node: fx.Node) -> None:
        target = node.args[0]
        if not isinstance(target, fx.Node):
            return
        my_pos = self._order[node]
        for user in target.users:
            if user is not node and self._order[user] > my_pos:
                raise ExtractionError(f"in-place `{node.name}` mutates a value read later", node)
        if target.op != "call_function" or target.target in VIEW_LIKE or target.target in _ops(
                "slice", "select", "unsqueeze", "expand", "transpose", "permute", "squeeze"):
            raise ExtractionError(f"in-place `{node.name}` mutates an input or a view", node)


def reshape_index(in_shape: Sequence[int], out_shape: Sequence[int], index: Sequence[Expr]) -> tuple[Expr, ...]:
    """Index into ``in_shape`` that a view to ``out_shape`` reads at ``index``."""
    if tuple(in_shape) == tuple(out_shape):
        return tuple(index)
    out_shape = list(out_shape)
    # drop/insert size-1 dims first
    out_nz = [(i, s) for i, s in enumerate(out_shape) if s != 1]
    in_nz = [(i, s) for i, s in enumerate(in_shape) if s != 1]
    result: list[Expr] = [E.const(0, E.INT64)] * len(in_shape)
    oi = ii = 0
    while oi < len(out_nz) or ii < len(in_nz):
        if oi >= len(out_nz) or ii >= len(in_nz):
            raise ExtractionError(f"cannot map view {tuple(in_shape)} -> {tuple(out_shape)}")
        o_grp, i_grp = [out_nz[oi]], [in_nz[ii]]
        po, pi = out_nz[oi][1], in_nz[ii][1]
        oi += 1
        ii += 1
        while po != pi:
            if po < pi:
                if oi >= len(out_nz):
                    raise ExtractionError("view bookkeeping failed")
                o_grp.append(out_nz[oi])
                po *= out_nz[oi][1]
                oi += 1
            else:
                if ii >= len(in_nz):
                    raise ExtractionError("view bookkeeping failed")
                i_grp.append(in_nz[ii])
                pi *= in_nz[ii][1]
                ii += 1
        # linear index of the group in the output
        lin: Expr | None = None
        for pos, size in o_grp:
            lin = index[pos] if lin is None else E.call(
                "add", E.call("mul", lin, E.const(size, E.INT64), dtype=E.INT64), index[pos], dtype=E.INT64)
        # unravel into the input group
        stride = 1
        for pos, size in reversed(i_grp):
            v = lin
            if stride != 1:
                v = E.call("floordiv", v, E.const(stride, E.INT64), dtype=E.INT64)
            if stride * size != pi or len(i_grp) > 1:
                if pos != i_grp[0][0]:
                    v = E.call("remainder", v, E.const(size, E.INT64), dtype=E.INT64)
            result[pos] = v
            stride *= size
    return tuple(result)


def _promote(da, db, args) -> str:
    ds = [d for d in (da, db) if d is not None]
    if not ds:
        return "float32"
    tensors = [torch.empty((), dtype=E.torch_dtype(d)) for d in ds]
    scalars = [a for a in args[:2] if not isinstance(a, fx.Node)]
    res = tensors[0] if len(tensors) == 1 else torch.result_type(tensors[0], tensors[1])
    if not isinstance(res, torch.Tensor):
        res = torch.empty((), dtype=res)
    for s in scalars:
        res = torch.empty((), dtype=torch.result_type(res, s))
    return E.dtype_name(res.dtype)


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _describe(node: fx.Node) -> str:
    return f"{node.name} = {getattr(node.target, '__name__', node.target)}"
