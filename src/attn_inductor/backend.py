"""The Dynamo backend ``flexattn``: options → capture → match → rewrite → Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="flexattn")`` works without importing us.
Everything that is not attention goes to stock Inductor (``compile_fx``)
unchanged.  Any failure of ours — capture, matching, an internal bug — leaves
the graph to stock Inductor with the reason recorded; it never breaks the
user's compile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Callable

import torch
import torch.fx as fx

from . import _compat, ops  # noqa: F401  (ops registers the custom op)
from .capture.aten import CaptureError, capture_aten_graph
from .lowering.extract import node_shape
from .lowering.match import AttentionMatch, MatchFailure, find_softmax_nodes, match_attention
from .lowering.rewrite import rewrite_attention
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


def _softmax_calls(gm: fx.GraphModule) -> list[str]:
    """Names of softmax calls in a Dynamo graph and its subgraphs (checkpointed regions included)."""
    import torch.nn.functional as F

    targets = {torch.softmax, F.softmax, torch.special.softmax, torch._softmax}
    names = []
    for mod in gm.modules():
        if not isinstance(mod, fx.GraphModule):
            continue
        for node in mod.graph.nodes:
            if (node.op == "call_function" and node.target in targets) or \
                    (node.op == "call_method" and node.target == "softmax"):
                names.append(node.name)
    return names


def rewrite_graph(gm: fx.GraphModule, example_inputs, options: BackendOptions
                  ) -> tuple[fx.GraphModule | None, list[SiteReport]]:
    """Capture and rewrite every attention site.  Returns (aten graph or None, reports)."""
    _graph_counter[0] += 1
    graph_id = _graph_counter[0]
    reports: list[SiteReport] = []
    try:
        aten_gm = capture_aten_graph(gm, example_inputs)
    except CaptureError as exc:
        # we cannot see inside; if there is a softmax, there may be attention: say so
        for i, name in enumerate(_softmax_calls(gm)):
            reports.append(SiteReport(graph=graph_id, site=i, node=name, rewritten=False,
                                      reason=f"graph not captured: {exc}"))
        return None, reports
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    real_inputs = {n: x for n, x in zip(placeholders, example_inputs)}
    source_names = {n: name for n, name in zip(placeholders, _compat.placeholder_source_names(gm)) if name}
    config = json.dumps(options.runtime_config(), sort_keys=True)
    for i, sm in enumerate(find_softmax_nodes(aten_gm)):
        if not options.rewrite:
            reports.append(describe_failure(graph_id, i, sm, MatchFailure("rewriting disabled by options", sm.name)))
            continue
        try:
            m = match_attention(aten_gm, sm, fully_masked_rows=options.fully_masked_rows)
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not break the user's compile
            log.warning("attn_inductor: internal error while matching %s: %s", sm.name, exc, exc_info=True)
            m = MatchFailure(f"internal error in the matcher: {type(exc).__name__}: {exc}", sm.name)
        if isinstance(m, MatchFailure):
            reports.append(describe_failure(graph_id, i, sm, m))
            continue
        report = describe_match(graph_id, i, m, real_inputs, options, source_names)
        rewrite_attention(aten_gm, m, config)
        reports.append(report)
    aten_gm.graph.eliminate_dead_code()
    aten_gm.graph.lint()
    aten_gm.recompile()
    return aten_gm, reports


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
    for r in reports:
        _record(r)
    if not any(r.rewritten for r in reports):
        new_gm = None  # nothing of ours in it: hand Inductor Dynamo's own graph
    target = new_gm if new_gm is not None else gm
    if _explain_only or not opts.inductor:
        return target.forward
    from torch._inductor.compile_fx import compile_fx

    patches = dict(opts.inductor_config)
    if mode and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    if patches:
        return compile_fx(target, example_inputs, config_patches=patches)
    return compile_fx(target, example_inputs)


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
