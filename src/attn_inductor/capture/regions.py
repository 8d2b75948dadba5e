"""Capture for Dynamo graphs with higher-order ops: HOPs stay opaque, attention is spliced back.

Note [region capture]
~~~~~~~~~~~~~~~~~~~~~
``make_fx`` inlines a higher-order op (``autograd_function_apply`` for a user
``torch.autograd.Function``, ``tag_activation_checkpoint`` for activation
checkpointing) as plain ops under no_grad, dropping its backward (Note
[higher-order ops] in ``aten.py``).  So a graph that contains one is never
handed to ``compile_fx`` as an aten re-trace.  Instead:

1. *Trace for matching only.*  ``fx.Interpreter`` runs a private copy of the
   Dynamo graph under ``make_fx`` (Dynamo's fake mode).  An *opaque* HOP is not
   run: its outputs are extra inputs of the trace (fresh fakes with Dynamo's
   metadata).  A *transparent* HOP (``tag_activation_checkpoint``, ``wrap``:
   AOTAutograd runs their body as plain code, re-running a checkpointed body in
   the backward) has its body run inline, so attention inside a checkpointed
   layer is matched with the context outside it (the mask built from
   ``attention_mask`` before the layers).  The aten graph is never run.  Its
   outputs are what the program consumes outside the traced ops (graph
   outputs, opaque HOP operands, body outputs), so "used elsewhere" keeps its
   meaning for the matcher.
2. *Value map* (Note [values and mutation]).  Right after each Dynamo node
   runs, the aten node that holds each of its tensors is recorded (the proxy of
   the very tensor object).  A Dynamo node and an aten node so paired hold the
   same tensor object, so at any later point of the program they read the same
   contents, in-place ops included; that is all a splice relies on.
3. *Match and rewrite the aten graph* (``match_attention``,
   ``rewrite_attention``), unchanged.
4. *Splice.*  The P·V value belongs to one Dynamo graph G (top level or a
   body).  The nodes the rewrite added (layout views, the op) and any producer
   of theirs that is not a Dynamo value are copied into G just before G's P·V
   node, whose uses are rerouted; code that only fed it is removed.  A value
   the copy reads that G does not have but an enclosing graph does (the
   ``attention_mask`` a checkpointed layer never received) is *threaded*: a new
   operand of the HOP, a new placeholder of the body.  Recomputing a producer
   at P·V instead of where it ran is refused when the trace mutates anything
   or the producer is random.  Nothing else changes, HOPs included, so
   AOTAutograd later traces their own forward and backward.
5. *Commit.*  Dead code is removed per graph; body inputs left unused are
   dropped with their HOP operands (the 4-D mask a layer no longer reads is
   then not built at all).

The caller's GraphModule and its bodies are never mutated: copies are made up
front and the result is a new top-level module, or None (nothing rewritten).
Softmaxes inside opaque HOP bodies (an ``autograd.Function``'s forward) are
reported with the reason and left as written.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot, make_fx
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten, tree_flatten_with_path

from .. import _compat
from ..lowering.match import AttentionMatch
from ..lowering.rewrite import rewrite_attention
from .aten import CaptureError

#: HOPs whose body AOTAutograd runs as plain code (operands in, outputs out): traced inline, rewritten in place
TRANSPARENT_HOPS = ("tag_activation_checkpoint", "wrap")

_OPAQUE_BODY_REASON = {
    "autograd_function_apply": "inside a custom torch.autograd.Function (higher-order op `autograd_function_apply`); "
                               "its forward and backward are left as written",
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


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _fresh_fake(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


@dataclass
class RegionRefusal:
    """Softmaxes we cannot work on (inside an opaque HOP body), reported with ``reason``."""

    prefix: str
    softmax_names: list[str]
    reason: str


@dataclass(eq=False)
class _Graph:
    """One Dynamo graph of the tree: the top level, or a transparent HOP's body (a private copy)."""

    gm: fx.GraphModule
    prefix: str
    parent: "_Graph | None" = None
    hop: fx.Node | None = None               # the node of parent.gm that runs this body
    changed: bool = False
    erased_inputs: list = field(default_factory=list)

    def order(self) -> dict:
        return {n: i for i, n in enumerate(self.gm.graph.nodes)}


class _TreeInterpreter(fx.Interpreter):
    """Runs one graph of the tree under make_fx: opaque HOPs give their precomputed outputs, transparent
    ones run their body inline; every node's value is reported to ``record`` right after it is computed."""

    def __init__(self, capture: "RegionCapture", g: _Graph):
        super().__init__(g.gm, garbage_collect_values=False)
        self.capture, self.g = capture, g
        capture._envs[g] = self.env

    def run_node(self, n: fx.Node):
        cap = self.capture
        if n in cap._opaque_values:
            val = cap._opaque_values[n]
            # what the HOP consumes is used outside the trace
            cap._sinks.append(fx.node.map_arg((n.args, n.kwargs), lambda a: self.env[a]))
        elif n in cap._bodies:
            body = cap._bodies[n]
            operands = [self.env[a] if isinstance(a, fx.Node) else a for a in n.args[1:]]
            val = _TreeInterpreter(cap, body).run(*operands)
            cap._sinks.append(val)
        else:
            val = super().run_node(n)
        if n.op != "get_attr":  # constants get their aten node when first used: recorded at the end
            cap._record(self.g, n, val)
        return val


class RegionCapture:
    """A Dynamo graph with HOPs, its transparent bodies, and the aten trace used to match them."""

    def __init__(self, gm: fx.GraphModule, example_inputs, fake_mode=None, remake=None):
        """``fake_mode`` and ``remake`` (a fake of Dynamo's -> a fake of ``fake_mode``) trace the graph at
        other sizes than Dynamo's (Note [dynamic sizes] in backend.py); by default Dynamo's own fakes."""
        self.fake_mode = fake_mode or _compat.fake_mode_of_graph(gm)
        self._remake = remake or (lambda t: t)
        if self.fake_mode is None:
            raise CaptureError("Dynamo recorded no fake inputs for this graph")
        self.top = _Graph(_copy_graph_module(gm), "")
        self.graphs: list[_Graph] = [self.top]
        self.refusals: list[RegionRefusal] = []
        self._bodies: dict[fx.Node, _Graph] = {}        # transparent HOP node -> its body
        self._opaque: list[fx.Node] = []
        self._expand(self.top)
        self._trace(example_inputs, _compat.placeholder_source_names(gm))

    # -- the tree of graphs ---------------------------------------------------
    def _expand(self, g: _Graph) -> None:
        claimed: set[str] = set()
        for hop in [n for n in g.gm.graph.nodes if is_higher_order_op(n)]:
            name = hop_name(hop)
            body_arg = hop.args[0] if hop.args else None
            body = getattr(g.gm, body_arg.target, None) if isinstance(body_arg, fx.Node) and \
                body_arg.op == "get_attr" else None
            if name in TRANSPARENT_HOPS and isinstance(body, fx.GraphModule) and not hop.kwargs.keys() - {
                    "use_reentrant", "context_fn"} and len(_placeholders(body)) == len(hop.args) - 1:
                attr = body_arg.target
                if attr in claimed or len(body_arg.users) > 1:  # one copy per call site: splices differ
                    i = 0
                    while hasattr(g.gm, f"{attr}_site{i}"):
                        i += 1
                    attr = f"{attr}_site{i}"
                    with g.gm.graph.inserting_before(hop):
                        new_arg = g.gm.graph.get_attr(attr)
                    hop.update_arg(0, new_arg)
                claimed.add(attr)
                copy = _copy_graph_module(body)
                setattr(g.gm, attr, copy)
                child = _Graph(copy, f"{g.prefix}{attr}.", g, hop)
                self.graphs.append(child)
                self._bodies[hop] = child
                self._expand(child)
                continue
            self._opaque.append(hop)
            for a in (*hop.args, *hop.kwargs.values()):
                sub = getattr(g.gm, a.target, None) if isinstance(a, fx.Node) and a.op == "get_attr" else None
                found = softmax_calls(sub) if isinstance(sub, fx.GraphModule) else []
                if found:
                    reason = _OPAQUE_BODY_REASON.get(
                        name, f"inside the body of the higher-order op `{name}`, which is left as written")
                    self.refusals.append(RegionRefusal(f"{g.prefix}{a.target}.", found, reason))

    # -- 1, 2: trace ----------------------------------------------------------
    def _record(self, g: _Graph, node: fx.Node, val) -> None:
        tracer = get_proxy_mode().tracer
        for path, leaf in tree_flatten_with_path(val)[0]:
            if isinstance(leaf, torch.Tensor):
                proxy = get_proxy_slot(leaf, tracer, None)
                if proxy is not None:
                    self.values.setdefault(proxy.proxy.node, []).append((g, node, tuple(path)))

    def _trace(self, example_inputs, source_names) -> None:
        top = self.top.gm
        placeholders = _placeholders(top)
        fakes = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
        if any(f is None for f in fakes) or len(fakes) != len(example_inputs):
            raise CaptureError("Dynamo recorded no fake inputs for this graph")
        with self.fake_mode:
            fakes = [self._remake(f) for f in fakes]
        # an opaque HOP's outputs become inputs: fresh fakes, so no two inputs are the same tensor
        hop_inputs, specs = [], {}
        with self.fake_mode:
            for h in self._opaque:
                if "example_value" not in h.meta:
                    raise CaptureError(f"Dynamo recorded no output for the higher-order op `{h.name}`")
                leaves, spec = tree_flatten(h.meta["example_value"])
                slots = []
                for leaf in leaves:
                    if isinstance(leaf, torch.Tensor):
                        slots.append(len(hop_inputs))
                        hop_inputs.append(_fresh_fake(self._remake(leaf)))
                    elif leaf is None or type(leaf) in (int, float, bool):
                        slots.append(("const", leaf))
                    else:
                        raise CaptureError(f"higher-order op `{h.name}` returns a {type(leaf).__name__}")
                specs[h] = (slots, spec)
        n_ph = len(placeholders)
        self.values: dict[fx.Node, list] = {}   # aten node -> [(_Graph, Dynamo node, path)], execution order

        def run(*flat):
            extra = flat[n_ph:]
            self._opaque_values = {h: spec.unflatten([extra[s] if isinstance(s, int) else s[1] for s in slots])
                                   for h, (slots, spec) in specs.items()}
            self._sinks, self._envs = [], {}
            result = _TreeInterpreter(self, self.top).run(*flat[:n_ph])
            for g, env in self._envs.items():
                for node in g.gm.graph.nodes:
                    if node.op == "get_attr":
                        self._record(g, node, env.get(node))
            return tuple(v for v in tree_flatten([result, self._sinks])[0] if isinstance(v, torch.Tensor))

        try:
            with self.fake_mode:
                self.aten_gm = make_fx(run, pre_dispatch=True, tracing_mode="real")(*fakes, *hop_inputs)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "leave it to Inductor"
            raise CaptureError(f"aten re-trace failed: {type(exc).__name__}: {exc}") from exc
        self.mutates = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                           and n.target._schema.is_mutable for n in self.aten_gm.graph.nodes)
        aten_ph = [n for n in self.aten_gm.graph.nodes if n.op == "placeholder"]
        self.real_inputs = {a: x for a, x in zip(aten_ph[:n_ph], example_inputs)}
        self.source_names = {a: s for a, s in zip(aten_ph[:n_ph], source_names) if s}

    def prefix_of(self, aten_node: fx.Node) -> str:
        """The prefix (``wrap_body_0.``) of the graph whose node holds ``aten_node``'s value."""
        for g, _node, path in self.values.get(aten_node, ()):
            if path == ():
                return g.prefix
        return ""

    # -- 4: splice -------------------------------------------------------------
    def _plan(self, a: fx.Node, g: _Graph, before: fx.Node, orders: dict):
        """Where graph ``g`` gets aten node ``a``'s value before node ``before``: a plan, or None."""
        order = orders.setdefault(g, g.order())
        for gg, node, path in self.values.get(a, ()):
            if gg is g and node in order and order[node] < order[before] and \
                    all(isinstance(k, (SequenceKey, MappingKey)) for k in path):
                return ("ref", g, node, path, a)
        if g.parent is not None:  # same tensor object, passed by reference: as sound as a direct reference
            outer = self._plan(a, g.parent, g.hop, orders)
            if outer is not None:
                return ("thread", g, outer, a)
        return None

    def _materialize(self, plan, before: fx.Node) -> fx.Node:
        if plan[0] == "ref":
            _, g, node, path, a = plan
            for key in path:
                with g.gm.graph.inserting_before(before):
                    node = g.gm.graph.call_function(
                        operator.getitem, (node, key.idx if isinstance(key, SequenceKey) else key.key))
                node.meta["example_value"] = a.meta.get("val")
            return node
        _, g, outer, a = plan
        outer_node = self._materialize(outer, g.hop)
        graph = g.gm.graph
        with graph.inserting_after(_placeholders(g.gm)[-1]):
            ph = graph.placeholder(outer_node.name)
        ph.meta["example_value"] = a.meta.get("val")
        g.hop.args = (*g.hop.args, outer_node)
        g.changed = g.parent.changed = True
        self.values.setdefault(a, []).insert(0, (g, ph, ()))
        return ph

    def splice(self, m: AttentionMatch, config: str, free: dict | None = None) -> None:
        """Rewrite site ``m`` in the aten graph and splice the result into its Dynamo graph.

        ``free``: as for ``rewrite_attention``.  Raises SpliceError, Dynamo graphs untouched, when the
        site cannot be spliced."""
        pv = m.output
        hit = next(((g, n) for g, n, path in self.values.get(pv, ()) if path == ()), None)
        if hit is None:
            raise SpliceError(f"P·V `{pv.name}` is computed inside a Dynamo op, not a value of the graph")
        g, dyn_pv = hit
        expected = dyn_pv.meta.get("example_value")

        anchor = pv.next
        existing = set(self.aten_gm.graph.nodes)
        rewrite_attention(self.aten_gm, m, config, free=free)
        out = anchor.prev
        self.values[out] = [(g, dyn_pv, ())]  # same value as the node it replaces, until spliced

        # plan, without touching a Dynamo graph: copies go into g before dyn_pv
        orders: dict = {}
        resolved, to_copy, stack = {}, set(), [out]
        while stack:
            a = stack.pop()
            if a in resolved or a in to_copy:
                continue
            if a is not out:
                plan = self._plan(a, g, dyn_pv, orders)
                if plan is not None:
                    resolved[a] = plan
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
        copies = sorted(to_copy, key=aten_order.__getitem__)
        try:
            with self.fake_mode:
                for a in copies:
                    if "val" not in a.meta:
                        args, kwargs = fx.node.map_arg((a.args, a.kwargs), lambda x: x.meta["val"])
                        a.meta["val"] = a.target(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise SpliceError(f"the rewritten nodes do not run on fake tensors: {type(exc).__name__}: {exc}") \
                from exc
        got = out.meta.get("val")
        if not (isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor)
                and got.shape == expected.shape and got.dtype == expected.dtype and _same_strides(got, expected)):
            raise SpliceError(f"the op's output ({_describe(got)}) does not have P·V's layout ({_describe(expected)})")

        # execute
        env = {a: self._materialize(plan, dyn_pv) for a, plan in resolved.items()}
        graph = g.gm.graph
        with graph.inserting_before(dyn_pv):
            for a in copies:
                new = graph.node_copy(a, lambda x: env[x])
                new.meta["example_value"] = a.meta["val"]
                env[a] = new
        dyn_pv.replace_all_uses_with(env[out])
        g.erased_inputs.extend(dyn_pv.all_input_nodes)
        graph.erase_node(dyn_pv)
        self.values[out] = [(g, env[out], ())]
        g.changed = True

    # -- 5: commit ---------------------------------------------------------------
    def commit(self) -> fx.GraphModule | None:
        """Clean up and recompile the changed graphs; the new top-level module, or None if none changed."""
        if not any(g.changed for g in self.graphs):
            return None
        for g in reversed(self.graphs):  # bodies before the graphs that call them
            if not g.changed:
                continue
            _remove_dead(g.gm.graph, g.erased_inputs)
            if g.hop is not None:
                self._drop_unused_inputs(g)
            g.gm.graph.lint()
            g.gm.recompile()
        return self.top.gm

    def _drop_unused_inputs(self, g: _Graph) -> None:
        hop, graph = g.hop, g.gm.graph
        operands = list(hop.args[1:])
        keep = []
        for ph, operand in zip(_placeholders(g.gm), operands):
            if ph.users:
                keep.append(operand)
            else:
                graph.erase_node(ph)
                if isinstance(operand, fx.Node):
                    g.parent.erased_inputs.append(operand)
        if len(keep) != len(operands):
            hop.args = (hop.args[0], *keep)
            g.parent.changed = True


def _remove_dead(graph: fx.Graph, start: list) -> None:
    """Erase nodes made dead by our edits (only those: ``start`` and what only they used)."""
    work = list(start)
    while work:
        n = work.pop()
        if getattr(n, "_erased", False) or n.users or not _removable(n):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        work.extend(inputs)


def _removable(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method") or is_higher_order_op(n) or n.is_impure():
        return False
    t = n.target
    if n.op == "call_method":
        return not (t.endswith("_") and not t.endswith("__"))
    if isinstance(t, torch._ops.OpOverload):
        return not t._schema.is_mutable
    if t in _INPLACE_OPERATORS:
        return False
    if getattr(t, "__module__", None) in ("_operator", "operator"):
        return True
    name = getattr(t, "__name__", "")
    return not (name.endswith("_") and not name.endswith("__"))  # torch.relu_ and friends


_INPLACE_OPERATORS = {operator.iadd, operator.iand, operator.iconcat, operator.ifloordiv, operator.ilshift,
                      operator.imatmul, operator.imod, operator.imul, operator.ior, operator.ipow, operator.irshift,
                      operator.isub, operator.itruediv, operator.ixor, operator.setitem, operator.delitem}


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides, ignoring dims of size 1 (their stride is never used)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}{list(v.shape)} strides {list(v.stride())}"
    return type(v).__name__
