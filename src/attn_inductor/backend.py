"""The Dynamo backend ``flexattn``: options → capture → match → rewrite → Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="flexattn")`` works without importing us.
Everything that is not attention goes to stock Inductor (``compile_fx``)
unchanged.  Any failure of ours — capture, matching, an internal bug, Inductor
failing on the rewritten graph — leaves the graph to stock Inductor with the
reason recorded; it never breaks the user's compile.

Two captures: a graph without higher-order ops is re-traced whole to aten
(``capture/aten.py``) and the rewritten aten graph goes to Inductor; a graph
with them (an ``autograd.Function``, activation checkpointing) keeps them
opaque and gets the op spliced into Dynamo's own graph, checkpointed bodies
included (``capture/regions.py``, Note [region capture]).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from typing import Callable

import torch
import torch.fx as fx

from . import _compat, ops  # noqa: F401  (ops registers the custom op)
from .capture.aten import CaptureError, capture_aten_graph
from .capture.regions import (RegionCapture, SpliceError, has_higher_order_ops,
                              softmax_calls)
from .lowering.match import AttentionMatch, MatchFailure, find_softmax_nodes, match_attention
from .lowering.rewrite import reshape_targets, rewrite_attention
from .options import BackendOptions
from .report import SiteReport, describe_match, describe_failure

log = logging.getLogger("attn_inductor")

_collector = threading.local()


@contextlib.contextmanager
def collect_reports():
    """Collect the SiteReports of every graph compiled inside the block."""
    prev = getattr(_collector, "reports", None)
    reports: list[SiteReport] = []
    _collector.reports = reports
    try:
        yield reports
    finally:
        _collector.reports = prev


def _record(report: SiteReport) -> None:
    reports = getattr(_collector, "reports", None)
    if reports is not None:
        reports.append(report)
    counters = torch._dynamo.utils.counters["attn_inductor"]
    counters["rewritten" if report.rewritten else "not_rewritten"] += 1


_graph_counter = [0]

#: tests only: send every graph through region capture (to compare it with the whole-graph capture)
_ALWAYS_REGIONS = False


def _not_spliced(exc: SpliceError) -> str:
    return f"matched, but the rewrite could not be put back into the graph: {exc}"


def _rewrite_sites(aten_gm: fx.GraphModule, softmaxes: list[fx.Node], graph_id: int, first_site: int,
                   options: BackendOptions, splice: Callable[[AttentionMatch], None], real_inputs: dict,
                   source_names: dict, prefix_of: Callable[[fx.Node], str] | None = None,
                   vet: Callable[[AttentionMatch], str | None] | None = None) -> list[SiteReport]:
    """Match every softmax of an aten graph and hand each match to ``splice``; one SiteReport each.

    ``vet`` may refuse a match (returns the reason); ``splice`` may raise SpliceError: either way the
    site is reported not rewritten, with its reason."""
    reports: list[SiteReport] = []
    for i, sm in enumerate(softmaxes, start=first_site):
        if not options.rewrite:
            report = describe_failure(graph_id, i, sm, MatchFailure("rewriting disabled by options", sm.name))
        else:
            try:
                m = match_attention(aten_gm, sm, fully_masked_rows=options.fully_masked_rows)
            except Exception as exc:  # noqa: BLE001 - a bug of ours must not break the user's compile
                log.warning("attn_inductor: internal error while matching %s: %s", sm.name, exc, exc_info=True)
                m = MatchFailure(f"internal error in the matcher: {type(exc).__name__}: {exc}", sm.name)
            if not isinstance(m, MatchFailure) and vet is not None and (refusal := vet(m)):
                m = MatchFailure(refusal, sm.name)
            if isinstance(m, MatchFailure):
                report = describe_failure(graph_id, i, sm, m)
            else:
                report = describe_match(graph_id, i, m, real_inputs, options, source_names)
                try:
                    splice(m)
                except SpliceError as exc:
                    report = describe_failure(graph_id, i, sm, MatchFailure(_not_spliced(exc), sm.name))
        prefix = prefix_of(sm) if prefix_of is not None else ""
        if prefix and report.node:
            report.node = prefix + report.node
        reports.append(report)
    return reports


def rewrite_graph(gm: fx.GraphModule, example_inputs, options: BackendOptions
                  ) -> tuple[fx.GraphModule | None, list[SiteReport]]:
    """Capture and rewrite every attention site.  Returns (graph for Inductor or None, reports).

    Graphs without higher-order ops are re-traced whole (``capture_aten_graph``) and the rewritten aten
    graph is returned; graphs with them keep their HOPs opaque (Note [region capture]) and the returned
    graph is Dynamo's, with each rewritten P·V spliced in."""
    _graph_counter[0] += 1
    graph_id = _graph_counter[0]
    config = json.dumps(options.runtime_config(), sort_keys=True)
    if _ALWAYS_REGIONS or has_higher_order_ops(gm):
        return _rewrite_keeping_hops(gm, example_inputs, options, graph_id, config)
    reports: list[SiteReport] = []
    try:
        aten_gm = capture_aten_graph(gm, example_inputs)
    except CaptureError as exc:
        # we cannot see inside; if there is a softmax, there may be attention: say so
        for i, name in enumerate(softmax_calls(gm)):
            reports.append(SiteReport(graph=graph_id, site=i, node=name, rewritten=False,
                                      reason=f"graph not captured: {exc}"))
        return None, reports
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    real_inputs = {n: x for n, x in zip(placeholders, example_inputs)}
    source_names = {n: name for n, name in zip(placeholders, _compat.placeholder_source_names(gm)) if name}
    softmaxes = find_softmax_nodes(aten_gm)
    reports = _rewrite_for_this_graph(
        gm, options,
        lambda splice: _rewrite_sites(aten_gm, softmaxes, graph_id, 0, options, splice, real_inputs, source_names),
        lambda m, free=None: rewrite_attention(aten_gm, m, config, free=free))
    aten_gm.graph.eliminate_dead_code()
    aten_gm.graph.lint()
    aten_gm.recompile()
    return aten_gm, reports


_ANY_LENGTH = "any (one graph with symbolic sizes)"


def _note_lengths(reports: list[SiteReport], specialised: str | None) -> None:
    """Say, on a symbolic graph's rewritten sites, whether the graph serves every length."""
    for r in reports:
        if r.rewritten:
            r.lengths = _ANY_LENGTH if specialised is None else f"this shape only (recompiles per length): " \
                                                                  f"{specialised}"


# Note [dynamic sizes]
#     From its second call with a new sequence length Dynamo traces a graph with
#     symbolic sizes (automatic dynamic shapes).  The matcher reads sizes as
#     ints; read with guards, every length would become its own graph, and
#     after ``recompile_limit`` (8) lengths Dynamo would stop compiling the
#     function at all and run it eagerly.  So a symbolic graph is first matched
#     with the ShapeEnv's guards suppressed (sizes read at their hints), and
#     kept symbolic only if the graph is re-traced and matched again, with
#     every size symbol at twice and at three times its hint (sizes still
#     symbolic, guards suppressed), with the same outcome:
#     - the same specs at every site: a size the score or mask computes with
#       (``L - 1`` in a relative-position index, a diagonal, a slice start) is
#       a graph value the spec reads from a captured 0-d tensor at run time,
#       while a hint baked into a constant (an index ``q_idx * L + kv_idx``
#       from ``arange(L * L).view(L, L)``) differs between the traces;
#     - each reshape the rewrite inserts ([B*H, L, D] layouts) varies in one
#       dim at most, which it writes as -1.
#     Anything else falls back to the specialised match (guards on the sizes).
#     The score simplifier folds comparisons the index ranges decide; for a
#     symbolic size the range is unbounded (``match.UNBOUNDED``), or a window
#     wider than the traced lengths would fold to True at the hint and at both
#     probes alike and be lost at longer lengths.
#     Two other sizes are evidence, not proof, of length independence: an
#     int read of a size inside the extractor (a reshape's index arithmetic)
#     would have to give the same spec at the hint, 2x and 3x to slip through.
#     Smaller sizes are not probed: simplifications the extractor makes from
#     index ranges (T5's bucket branches fold away for short sequences) are
#     valid on every sub-range, so a spec right at the hint stays right below
#     it, while a smaller probe would differ and needlessly specialise.  The
#     op itself takes any shapes: the runtime sizes its tables per call.


def _rewrite_for_this_graph(gm: fx.GraphModule, options: BackendOptions, match_sites, splice,
                            regions: bool = False) -> list[SiteReport]:
    """Match and rewrite every site of one graph: for any length when Dynamo traced it with symbolic sizes
    and Note [dynamic sizes] allows, else for the sizes it was traced at.

    ``match_sites(hand_over)`` runs ``_rewrite_sites`` handing each match to ``hand_over``; ``splice(m,
    free=None)`` rewrites one site (it may raise SpliceError).  Matching leaves the graph untouched, so a
    symbolic attempt that ends specialised costs no second capture."""
    shape_env = _compat.symbolic_shape_env(gm)
    if shape_env is None:
        return match_sites(splice)
    outcome = _rewrite_for_any_length(gm, options, shape_env, match_sites, splice, regions)
    if not isinstance(outcome, str):
        return outcome
    reports = match_sites(splice)
    _note_lengths(reports, outcome)
    return reports


def _rewrite_for_any_length(gm: fx.GraphModule, options: BackendOptions, shape_env, match_sites, splice,
                            regions: bool) -> list[SiteReport] | str:
    """Note [dynamic sizes]: the reports of the sites rewritten for any length, or why the graph is to be
    specialised (then nothing was rewritten)."""
    pending: list[AttentionMatch] = []
    try:
        with shape_env.suppress_guards():
            reports = match_sites(pending.append)
            sites = [_site_key(m) for m in pending]
    except Exception as exc:  # noqa: BLE001 - the specialised path is always there
        log.info("attn_inductor: matching with symbolic sizes failed, specialising: %s", exc)
        return f"matching with symbolic sizes failed ({type(exc).__name__})"
    if pending:
        free = _free_dims_at_other_lengths(gm, sites, options, regions)
        if isinstance(free, str):
            return free
        handed_over = [i for i, r in enumerate(reports) if r.rewritten]  # one per pending match, in order
        with shape_env.suppress_guards():  # the rewrite reads the same hinted sizes again
            for m, site_free, i in zip(pending, free, handed_over):
                try:
                    splice(m, free=site_free)
                except SpliceError as exc:
                    r = reports[i]
                    reports[i] = SiteReport(graph=r.graph, site=r.site, node=r.node, rewritten=False,
                                            reason=_not_spliced(exc))
    _note_lengths(reports, None)
    return reports


def _site_key(m: AttentionMatch) -> tuple:
    """What must agree between traces at different sizes: the spec and the reshapes the rewrite inserts."""
    return m.spec.to_json(), reshape_targets(m)


def _free_dims_at_other_lengths(gm: fx.GraphModule, sites: list, options: BackendOptions,
                                regions: bool = False) -> list | str:
    """Re-trace ``gm`` with every size symbol at 2x and 3x its hint and match again (guards suppressed).

    ``sites``: (spec JSON, reshape targets) of each site matched at the hints.  The re-traces must give
    the same specs; a reshape target may differ from its hint values in one dim at most, which the
    rewrite writes as -1.  Returns, per site, {target name: that dim}, or why not (specialise).  The sizes
    stay symbolic in the re-trace, so a spec that reads a size at run time (a captured length) compares
    equal, and one that baked a hint into a constant does not; where this torch's ShapeEnv cannot be
    driven so, the re-trace is static."""
    fakes = _compat.placeholder_fakes(gm)
    symbols = {}
    for val in fakes:
        sizes = [val] if isinstance(val, torch.SymInt) else \
            [*val.shape, *val.stride()] if isinstance(val, torch.Tensor) else []
        for x in sizes:
            if isinstance(x, torch.SymInt):
                for sym in x.node.expr.free_symbols:
                    symbols[sym] = _compat.symbol_hint(x, sym)
    if None in symbols.values():
        return "a size has no recorded value (data-dependent)"
    free: list[dict] = [{} for _ in sites]
    for factor in (2, 3):
        values = {sym: hint * factor for sym, hint in symbols.items()}
        got = None
        for symbolic in (True, False):
            try:
                got = _sites_at(gm, fakes, values, symbolic, options, regions)
                break
            except Exception as exc:  # noqa: BLE001 - try the other re-trace, then specialise
                log.info("attn_inductor: %s re-trace at other sizes failed: %s", "symbolic" if symbolic else
                         "static", exc)
        if got is None:
            return "the graph could not be re-traced at other sizes"
        if [spec for spec, _ in got] != [spec for spec, _ in sites]:
            return "a spec holds a constant computed from a size (it differs at other sizes)"
        for site_free, (_, targets), (_, other) in zip(free, sites, got):
            if set(targets) != set(other):
                return "the rewrite's reshapes differ at other sizes"
            for name, shape in targets.items():
                varies = [d for d, (a, b) in enumerate(zip(shape, other[name])) if a != b]
                if len(shape) != len(other[name]) or len(varies) > 1 or \
                        (varies and site_free.get(name, varies[0]) != varies[0]):
                    return f"a reshape of {name} has more than one size that varies"
                if varies:
                    site_free[name] = varies[0]
    return free


def _sites_at(gm: fx.GraphModule, fakes: list, values: dict, symbolic: bool, options: BackendOptions,
              regions: bool = False) -> list:
    """(spec JSON, reshape targets) of the sites matched in ``gm`` traced with size symbols at ``values``
    (whole, or as region capture traces it: ``regions``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    env = None
    if symbolic:
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

        env = ShapeEnv()
        renamed = {sym: env.create_symbol(value, ConstantSource(f"attn_inductor_{sym}"),
                                          dynamic_dim=DimDynamic.DYNAMIC) for sym, value in values.items()}

        def size(x):
            if not isinstance(x, torch.SymInt):
                return int(x)
            return env.create_symintnode(x.node.expr.xreplace(renamed), hint=_compat.concrete_size(x, values))
    else:
        def size(x):
            return _compat.concrete_size(x, values)
    mode = FakeTensorMode(shape_env=env)

    def remake(val):  # call inside ``mode``
        if isinstance(val, torch.SymInt):
            return size(val)
        if isinstance(val, torch.Tensor):
            return torch.empty_strided([size(x) for x in val.shape], [size(x) for x in val.stride()],
                                       dtype=val.dtype, device=val.device, requires_grad=val.requires_grad)
        return val

    if regions:
        traced = RegionCapture(gm, fakes, fake_mode=mode, remake=remake).aten_gm
    else:
        with mode:
            traced = make_fx(gm, pre_dispatch=True, tracing_mode="real")(*[remake(v) for v in fakes])
    specs = []
    with env.suppress_guards() if env is not None else contextlib.nullcontext():
        for sm in find_softmax_nodes(traced):
            m = match_attention(traced, sm, fully_masked_rows=options.fully_masked_rows)
            if not isinstance(m, MatchFailure):
                specs.append(_site_key(m))
    return specs


def _rewrite_keeping_hops(gm: fx.GraphModule, example_inputs, options: BackendOptions, graph_id: int,
                          config: str) -> tuple[fx.GraphModule | None, list[SiteReport]]:
    """Region capture (Note [region capture]): HOPs stay opaque, transparent bodies are rewritten in place."""
    if not softmax_calls(gm):
        return None, []  # no softmax anywhere (bodies included): spare the trace
    try:
        capture = RegionCapture(gm, example_inputs)
    except Exception as exc:  # noqa: BLE001 - CaptureError, or a bug of ours: the graph goes to stock Inductor
        if isinstance(exc, CaptureError):
            reason = f"graph not captured: {exc}"
        else:
            log.warning("attn_inductor: region capture failed: %s", exc, exc_info=True)
            reason = f"internal error in region capture: {type(exc).__name__}: {exc}"
        return None, [SiteReport(graph=graph_id, site=i, node=name, rewritten=False, reason=reason)
                      for i, name in enumerate(softmax_calls(gm))]
    softmaxes = find_softmax_nodes(capture.aten_gm)
    try:
        reports = _rewrite_for_this_graph(
            gm, options,
            lambda splice: _rewrite_sites(capture.aten_gm, softmaxes, graph_id, 0, options, splice,
                                          capture.real_inputs, capture.source_names, capture.prefix_of),
            lambda m, free=None: capture.splice(m, config, free=free), regions=True)
        new_gm = capture.commit()
    except Exception as exc:  # noqa: BLE001 - the graph is left as Dynamo produced it
        log.warning("attn_inductor: region rewrite failed, compiling with stock Inductor: %s", exc, exc_info=True)
        reports = [SiteReport(graph=graph_id, site=i, node=capture.prefix_of(sm) + sm.name, rewritten=False,
                              reason=f"internal error: {type(exc).__name__}: {exc}") for i, sm in enumerate(softmaxes)]
        new_gm = None
    for refusal in capture.refusals:
        for name in refusal.softmax_names:
            reports.append(SiteReport(graph=graph_id, site=len(reports), node=refusal.prefix + name,
                                      rewritten=False, reason=refusal.reason))
    return new_gm, reports


def flexattn_backend(gm: fx.GraphModule, example_inputs, *, options=None, mode=None, _explain_only: bool = False):
    opts = BackendOptions.from_dict(options)
    new_gm, reports = None, []
    try:
        new_gm, reports = rewrite_graph(gm, example_inputs, opts)
    except Exception as exc:  # noqa: BLE001
        log.warning("attn_inductor: rewrite failed, compiling with stock Inductor: %s", exc, exc_info=True)
        reports = [SiteReport(graph=_graph_counter[0], site=0, node=None, rewritten=False,
                              reason=f"internal error: {type(exc).__name__}: {exc}")]
        new_gm = None
    if not any(r.rewritten for r in reports):
        new_gm = None  # nothing of ours in it: hand Inductor Dynamo's own graph
    target = new_gm if new_gm is not None else gm
    if _explain_only or not opts.inductor:
        for r in reports:
            _record(r)
        return target.forward
    from torch._inductor.compile_fx import compile_fx

    patches = dict(opts.inductor_config)
    if mode and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))

    def inductor(graph):
        if graph is gm:  # Dynamo's own graph: nothing of ours in it
            return compile_fx(graph, example_inputs, config_patches=patches) if patches else \
                compile_fx(graph, example_inputs)
        from .ops import compile_decompositions  # Note [the op in compiled graphs] in ops.py

        return compile_fx(graph, example_inputs, config_patches=patches or None,
                          decompositions=compile_decompositions())

    if target is not gm:
        # our graph failing to compile is our failure: Dynamo's graph, untouched, goes to stock Inductor
        try:
            compiled = inductor(target)
        except Exception as exc:  # noqa: BLE001
            log.warning("attn_inductor: the rewritten graph failed to compile, compiling with stock Inductor: %s",
                        exc, exc_info=True)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            reason = f"the rewritten graph failed to compile: {type(exc).__name__}: {first}"
            reports = [dataclasses.replace(r, rewritten=False, reason=reason) if r.rewritten else r
                       for r in reports]
        else:
            for r in reports:
                _record(r)
            return compiled
    for r in reports:
        _record(r)
    return inductor(gm)


def make_backend(options=None, *, explain_only: bool = False) -> Callable:
    """A backend callable with options bound (for ``torch.compile(backend=...)`` and explain)."""

    def backend(gm, example_inputs, **kwargs):
        merged = dict(options or {})
        merged.update(kwargs.pop("options", None) or {})
        return flexattn_backend(gm, example_inputs, options=merged, _explain_only=explain_only, **kwargs)

    backend.__name__ = "flexattn"
    return backend


def _register_by_name() -> None:
    """Make ``backend="flexattn"`` resolve even when the package is on sys.path without its
    entry-point metadata (e.g. a source checkout on PYTHONPATH).  The entry point is the normal route."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if any(ep.name == "flexattn" for ep in entry_points(group="torch_dynamo_backends")):
        return  # torch registers us itself when it loads the entry point
    if "flexattn" not in registry._COMPILER_FNS:
        try:
            registry.register_backend(flexattn_backend, name="flexattn")
        except AssertionError:  # registered concurrently through the entry point
            pass


_register_by_name()
