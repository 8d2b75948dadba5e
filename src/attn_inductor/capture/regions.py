"""Capture for Dynamo graphs with higher-order ops: HOPs stay opaque, attention is spliced back.

Note [region capture]
~~~~~~~~~~~~~~~~~~~~~
``make_fx`` inlines a higher-order op (``autograd_function_apply`` for a user
``torch.autograd.Function``, ``tag_activation_checkpoint`` for activation
checkpointing) as plain ops under no_grad, dropping its backward (Note
[higher-order ops] in ``aten.py``).  So a graph that contains one is never
handed to ``compile_fx`` as an aten re-trace.  Instead:

1. *Trace with HOPs opaque.*  An ``fx.Interpreter`` runs the Dynamo graph under
   ``make_fx`` (Dynamo's fake mode); a HOP node is not run, its outputs are
   extra graph inputs (fresh fakes with the metadata Dynamo recorded).  The
   aten graph so obtained sees every op outside the HOPs, exactly the context
   the whole-graph capture gives the matcher, and is used for matching only:
   it is never run.  Its outputs are the Dynamo graph's outputs plus the HOPs'
   operands (so "used elsewhere" still means what it means in the program).
2. *Value map.*  The trace also returns every Dynamo node's tensor value, which
   maps each aten node that holds one to the Dynamo nodes holding the same
   tensor.  Graphs whose trace mutates a tensor in place are refused: with
   mutation, "same tensor" would not mean "same value" at the splice point.
3. *Match and rewrite on the aten graph* (``match_attention``,
   ``rewrite_attention``), unchanged.
4. *Splice.*  The nodes the rewrite added (layout views, the op, and whatever
   produces a captured tensor that is not itself a Dynamo value) are copied
   into a private copy of the Dynamo graph just before the Dynamo node that
   holds the P·V value, reading mapped Dynamo nodes where the aten graph reads
   mapped aten nodes; that P·V node's uses are rerouted and the code that only
   fed it is removed.  Nothing else in the Dynamo graph changes, HOPs included,
   so AOTAutograd later traces their own forward and backward.
5. *Bodies.*  ``tag_activation_checkpoint`` and ``wrap`` run their body as
   plain code under AOTAutograd (the body is re-run in the backward, which is
   what checkpointing means), so the same capture is applied to the body
   sub-GraphModule (a copy, swapped in on the copied parent).  Other HOP bodies
   (an ``autograd.Function``'s forward/backward, control flow) are left as
   written and their softmaxes reported with the reason.

Every graph (top level or body) succeeds or fails on its own; a failing graph
is left exactly as Dynamo produced it.  The caller's graph is never mutated.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot, make_fx
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten, tree_flatten_with_path

from .. import _compat
from ..lowering.match import AttentionMatch
from ..lowering.rewrite import rewrite_attention
from .aten import CaptureError

#: HOPs whose body AOTAutograd runs as plain code: attention inside is rewritten in place
TRANSPARENT_HOPS: tuple[str, ...] = ()

_OPAQUE_BODY_REASON = {
    "autograd_function_apply": "inside a custom torch.autograd.Function (higher-order op `autograd_function_apply`); "
                               "its forward and backward are left as written",
    "tag_activation_checkpoint": "inside an activation-checkpointed region (higher-order op "
                                 "`tag_activation_checkpoint`): not rewritten yet",
}


class SpliceError(RuntimeError):
    """The rewritten site cannot be put back into the Dynamo graph; the site is left as it was."""


def is_higher_order_op(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)


def hop_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def has_higher_order_ops(gm: fx.GraphModule) -> bool:
    return any(is_higher_order_op(n) for n in gm.graph.nodes)


def softmax_calls(gm: fx.GraphModule, recurse: bool = True) -> list[str]:
    """Names of Dynamo-level softmax calls in ``gm`` (and its sub-GraphModules when ``recurse``)."""
    import torch.nn.functional as F

    targets = {torch.softmax, F.softmax, torch.special.softmax, torch._softmax, torch.Tensor.softmax}
    mods = [(name, m) for name, m in gm.named_modules() if isinstance(m, fx.GraphModule)] if recurse else [("", gm)]
    names = []
    for prefix, mod in mods:
        for node in mod.graph.nodes:
            if (node.op == "call_function" and node.target in targets) or \
                    (node.op == "call_method" and node.target == "softmax"):
                names.append(f"{prefix}.{node.name}" if prefix else node.name)
    return names


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own copy of ``gm``'s graph; attributes (bodies, constants) are shared."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def _body_attrs(hop: fx.Node) -> list[str]:
    """get_attr targets among a HOP's arguments (its body sub-GraphModules)."""
    return [a.target for a in (*hop.args, *hop.kwargs.values()) if isinstance(a, fx.Node) and a.op == "get_attr"]


# ----------------------------------------------------------------------------- one graph


@dataclass
class InputInfo:
    """What is known about a graph input: the real example tensor and a readable name."""

    real: object = None
    name: str | None = None


def _operand_info(operand, ph_info: dict) -> InputInfo:
    """A body input: the outer graph's input it comes from, or at least the outer value's name."""
    if not isinstance(operand, fx.Node):
        return InputInfo()
    return ph_info.get(operand) or InputInfo(name=operand.name)


@dataclass
class RegionRefusal:
    """A graph (or HOP body) we cannot work in: its softmaxes are reported with ``reason``."""

    prefix: str
    softmax_names: list[str]
    reason: str


class _OpaqueHopInterpreter(fx.Interpreter):
    """Runs a Dynamo graph under make_fx; HOP nodes are not run (their outputs are given), and every
    node's value is reported to ``record`` right after it is computed."""

    def __init__(self, gm: fx.GraphModule, hop_values: dict, record):
        super().__init__(gm, garbage_collect_values=False)
        self.hop_values = hop_values
        self.record = record

    def run_node(self, n: fx.Node):
        val = self.hop_values[n] if n in self.hop_values else super().run_node(n)
        if n.op != "get_attr":
            self.record(n, val)
        return val


def _fresh_fake(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


@dataclass
class Region:
    """One Dynamo graph (a private copy), traced with HOPs opaque, ready for matching and splicing."""

    prefix: str
    gm: fx.GraphModule                   # private copy of the Dynamo graph: splices go here
    aten_gm: fx.GraphModule              # matching only; never run
    values: dict                         # aten node -> [(Dynamo node, pytree path)], Dynamo graph order
    real_inputs: dict                    # aten placeholder -> real example input
    source_names: dict                   # aten placeholder -> readable name
    fake_mode: object = None
    mutates: bool = False                # the trace has an in-place op (Note [values and mutation])
    spliced: int = 0
    committed: bool = False
    _erased_inputs: list = field(default_factory=list)

    # -- 1, 2: trace --------------------------------------------------------
    @classmethod
    def trace(cls, gm: fx.GraphModule, prefix: str, inputs: list[InputInfo], fake_mode) -> "Region":
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        fakes = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
        if any(f is None for f in fakes):
            raise CaptureError("Dynamo recorded no fake inputs for this graph")
        hops = [n for n in gm.graph.nodes if is_higher_order_op(n)]
        order = {n: i for i, n in enumerate(gm.graph.nodes)}

        # a HOP's outputs become inputs: fresh fakes, so no two inputs are the same tensor
        hop_inputs, hop_specs = [], {}
        with fake_mode:
            for h in hops:
                if "example_value" not in h.meta:
                    raise CaptureError(f"Dynamo recorded no output for the higher-order op `{h.name}`")
                leaves, spec = tree_flatten(h.meta["example_value"])
                slots = []
                for leaf in leaves:
                    if isinstance(leaf, torch.Tensor):
                        slots.append(len(hop_inputs))
                        hop_inputs.append(_fresh_fake(leaf))
                    elif leaf is None or type(leaf) in (int, float, bool):
                        slots.append(("const", leaf))
                    else:
                        raise CaptureError(f"higher-order op `{h.name}` returns a {type(leaf).__name__}")
                hop_specs[h] = (slots, spec)

        n_ph = len(placeholders)
        values: dict[fx.Node, list] = {}   # aten node -> [(Dynamo node, path)]

        def record(node, val):
            tracer = get_proxy_mode().tracer
            for path, leaf in tree_flatten_with_path(val)[0]:
                if isinstance(leaf, torch.Tensor):
                    proxy = get_proxy_slot(leaf, tracer, None)
                    if proxy is not None:
                        values.setdefault(proxy.proxy.node, []).append((node, tuple(path)))

        def run(*flat):
            extra = flat[n_ph:]
            hop_values = {}
            for h, (slots, spec) in hop_specs.items():
                leaves = [extra[s] if isinstance(s, int) else s[1] for s in slots]
                hop_values[h] = spec.unflatten(leaves)
            interp = _OpaqueHopInterpreter(gm, hop_values, record)
            interp.run(*flat[:n_ph])
            env = interp.env
            for node in gm.graph.nodes:
                if node.op == "get_attr":  # constants get their aten node when first used
                    record(node, env.get(node))
            # sink: what the program consumes outside the traced ops (its outputs, the HOPs' operands)
            out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
            sinks = [out_node.args] + [(h.args, h.kwargs) for h in hops]
            return tuple(v for v in tree_flatten(fx.node.map_arg(sinks, lambda n: env[n]))[0]
                         if isinstance(v, torch.Tensor))

        try:
            with fake_mode:
                aten_gm = make_fx(run, pre_dispatch=True, tracing_mode="real")(*fakes, *hop_inputs)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "leave it to Inductor"
            raise CaptureError(f"aten re-trace failed: {type(exc).__name__}: {exc}") from exc
        for lst in values.values():
            lst.sort(key=lambda np: (order[np[0]], len(np[1])))
        mutates = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                      and n.target._schema.is_mutable for n in aten_gm.graph.nodes)

        aten_ph = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
        real_inputs, source_names = {}, {}
        for a, info in zip(aten_ph[:n_ph], inputs):
            if info.real is not None:
                real_inputs[a] = info.real
            if info.name:
                source_names[a] = info.name
        return cls(prefix=prefix, gm=gm, aten_gm=aten_gm, values=values, real_inputs=real_inputs,
                   source_names=source_names, fake_mode=fake_mode, mutates=mutates)

    # -- 4: splice ----------------------------------------------------------
    def _dynamo_value(self, a: fx.Node, before: fx.Node, order: dict):
        """(Dynamo node, path) holding aten node ``a``'s value, defined before ``before``; or None."""
        for node, path in self.values.get(a, ()):
            if node in order and order[node] < order[before] and \
                    all(isinstance(k, (SequenceKey, MappingKey)) for k in path):
                return node, path
        return None

    def splice(self, m: AttentionMatch, config: str) -> None:
        """Rewrite site ``m`` in the aten graph and splice the result into the Dynamo graph.

        Raises SpliceError (Dynamo graph untouched) when the site cannot be spliced."""
        graph = self.gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        pv = m.output
        dyn_pv = next((n for n, path in self.values.get(pv, ()) if path == () and n in order), None)
        if dyn_pv is None:
            raise SpliceError(f"P·V `{pv.name}` is computed inside a Dynamo op, not a value of the graph")
        expected = dyn_pv.meta.get("example_value")

        anchor = pv.next
        existing = set(self.aten_gm.graph.nodes)
        rewrite_attention(self.aten_gm, m, config)
        out = anchor.prev
        self.values[out] = [(dyn_pv, ())]  # same value as the node it replaces, until spliced

        # plan: aten nodes to copy (not Dynamo values) and where the others come from
        resolved, to_copy, stack = {}, set(), [out]
        while stack:
            a = stack.pop()
            if a in resolved or a in to_copy:
                continue
            if a is not out:
                hit = self._dynamo_value(a, dyn_pv, order)
                if hit is not None:
                    resolved[a] = hit
                    continue
            if a.op != "call_function":
                raise SpliceError(f"`{a.name}` ({a.op}) feeds the rewritten site but is not a value of the graph")
            t = a.target
            if a in existing:  # computed earlier in the program; the copy runs at P·V's position
                if self.mutates:
                    raise SpliceError(f"`{a.name}` ({t}) is not a value of the graph and the graph mutates "
                                      "tensors in place: recomputing it at P·V could read other values")
                if isinstance(t, torch._ops.OpOverload) and (t._schema.is_mutable or
                                                             torch.Tag.nondeterministic_seeded in t.tags):
                    raise SpliceError(f"`{a.name}` ({t}) is not a value of the graph and cannot be recomputed "
                                      "(in-place or random)")
            to_copy.add(a)
            stack.extend(a.all_input_nodes)

        # the rewrite's new nodes carry no fake values yet: run them on fakes (also a check that they run)
        aten_order = {n: i for i, n in enumerate(self.aten_gm.graph.nodes)}
        try:
            with self.fake_mode:
                for a in sorted(to_copy, key=aten_order.__getitem__):
                    if "val" not in a.meta:
                        args, kwargs = fx.node.map_arg((a.args, a.kwargs), lambda x: x.meta["val"])
                        a.meta["val"] = a.target(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise SpliceError(f"the rewritten nodes do not run on fake tensors: {type(exc).__name__}: {exc}") \
                from exc
        got = out.meta.get("val")
        if not (isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor)
                and got.shape == expected.shape and got.dtype == expected.dtype
                and _same_strides(got, expected)):
            raise SpliceError(f"the op's output ({_describe(got)}) does not have P·V's layout ({_describe(expected)})")

        # execute: nothing above touched the Dynamo graph
        env = {}
        with graph.inserting_before(dyn_pv):
            for a, (node, path) in resolved.items():
                for key in path:
                    node = graph.call_function(operator.getitem, (node, key.idx if isinstance(key, SequenceKey)
                                                                  else key.key))
                env[a] = node
            for a in sorted(to_copy, key=aten_order.__getitem__):
                new = graph.node_copy(a, lambda x: env[x])
                if "val" in a.meta:
                    new.meta["example_value"] = a.meta["val"]
                env[a] = new
        dyn_pv.replace_all_uses_with(env[out])
        self._erased_inputs.extend(dyn_pv.all_input_nodes)
        graph.erase_node(dyn_pv)
        self.values[out] = [(env[out], ())]
        self.spliced += 1

    def commit(self) -> None:
        """Remove the code that only fed replaced P·V nodes, check and recompile the graph."""
        graph = self.gm.graph
        work = list(self._erased_inputs)
        while work:
            n = work.pop()
            if getattr(n, "_erased", False) or n.users or not _removable(n):
                continue
            inputs = n.all_input_nodes
            graph.erase_node(n)
            work.extend(inputs)
        graph.lint()
        self.gm.recompile()
        self.committed = True


def _removable(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method") or is_higher_order_op(n) or n.is_impure():
        return False
    t = n.target
    if n.op == "call_method":
        return not (t.endswith("_") and not t.endswith("__"))
    if isinstance(t, torch._ops.OpOverload):
        return not t._schema.is_mutable
    name = getattr(t, "__name__", "")
    return not (name.endswith("_") and not name.endswith("__"))


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides, ignoring dims of size 1 (their stride is never used)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}{list(v.shape)} strides {list(v.stride())}"
    return type(v).__name__


# ----------------------------------------------------------------------------- the walk


class RegionCapture:
    """Walk a Dynamo graph with HOPs: yields a :class:`Region` (or :class:`RegionRefusal`) for the top
    level, then for each transparent HOP body, depth first.  The consumer matches and splices each
    Region and calls ``commit()`` (or nothing, which leaves that graph as it was); ``result()`` is
    then the rewritten top-level module, or None when nothing was rewritten."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        self.example_inputs = list(example_inputs)
        self._result = None

    def regions(self) -> Iterator[Region | RegionRefusal]:
        fake_mode = _compat.fake_mode_of_graph(self.gm)
        names = _compat.placeholder_source_names(self.gm)
        inputs = [InputInfo(real, name) for real, name in zip(self.example_inputs, names)]
        self._done: dict[int, fx.GraphModule | None] = {}
        self._result = yield from self._walk(self.gm, "", inputs, fake_mode)

    def result(self) -> fx.GraphModule | None:
        return self._result

    def _walk(self, gm, prefix, inputs, fake_mode):
        work, region = _copy_graph_module(gm), None
        if fake_mode is None:
            yield RegionRefusal(prefix, softmax_calls(gm, recurse=False),
                                "graph not captured: Dynamo recorded no fake inputs for this graph")
        else:
            try:
                region = Region.trace(work, prefix, inputs, fake_mode)
            except CaptureError as exc:
                yield RegionRefusal(prefix, softmax_calls(gm, recurse=False), f"graph not captured: {exc}")
            else:
                yield region
                if not region.committed:
                    work = _copy_graph_module(gm)  # whatever happened to the copy is dropped
        changed = region is not None and region.committed and region.spliced > 0

        placeholders = [n for n in work.graph.nodes if n.op == "placeholder"]
        ph_info = {n: info for n, info in zip(placeholders, inputs)}
        for hop in [n for n in work.graph.nodes if is_higher_order_op(n)]:
            name = hop_name(hop)
            for attr in _body_attrs(hop):
                body = getattr(work, attr, None)
                if not isinstance(body, fx.GraphModule):
                    continue
                sub_prefix = f"{prefix}{attr}."
                if id(body) in self._done:
                    new_body = self._done[id(body)]
                elif name in TRANSPARENT_HOPS:
                    operands = hop.args[1:]
                    body_ph = [n for n in body.graph.nodes if n.op == "placeholder"]
                    body_inputs = [_operand_info(o, ph_info) for o in operands] \
                        if len(operands) == len(body_ph) else [InputInfo() for _ in body_ph]
                    new_body = yield from self._walk(body, sub_prefix, body_inputs,
                                                     _compat.fake_mode_of_graph(body) or fake_mode)
                    self._done[id(body)] = new_body
                else:
                    found = softmax_calls(body)
                    if found:
                        reason = _OPAQUE_BODY_REASON.get(
                            name, f"inside the body of the higher-order op `{name}`, which is left as written")
                        yield RegionRefusal(sub_prefix, found, reason)
                    self._done[id(body)] = new_body = None
                if new_body is not None:
                    setattr(work, attr, new_body)
                    changed = True
        if changed:
            work.recompile()
            return work
        return None
