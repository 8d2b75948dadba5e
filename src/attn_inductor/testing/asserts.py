"""``assert_rewritten``: the one-line CI check that every attention site was rewritten.

It runs :func:`attn_inductor.explain` and turns the report into a test
verdict.  The assertion message always carries the full explain table, so a
CI log says which site was refused and the matcher's reason, verbatim.

It checks rewriting only, not numerics (see :mod:`attn_inductor.testing.cli`
for a check that also compares compiled outputs with eager).  Like
``explain`` it calls ``torch._dynamo.reset()``.
"""

from __future__ import annotations

from ..explain import ExplainReport, explain

__all__ = ["assert_rewritten", "rewrite_problems"]


def rewrite_problems(report: ExplainReport, expected: int | None = None) -> list[str]:
    """What is wrong with ``report`` for a "fully rewritten" verdict; empty when nothing is."""
    problems = []
    if not report.sites:
        problems.append("no attention site found (no softmax in the compiled graphs"
                        + (f"; {len(report.graph_breaks)} Dynamo graph break(s)" if report.graph_breaks else "")
                        + ")")
    missed = report.not_rewritten
    if missed:
        problems.append(f"{len(missed)} of {len(report.sites)} attention site(s) not rewritten")
    if expected is not None and len(report.sites) != expected:
        problems.append(f"expected {expected} attention site(s), found {len(report.sites)}")
    return problems


def assert_rewritten(model, *inputs, expected: int | None = None, options: dict | None = None,
                     **kwargs) -> ExplainReport:
    """Assert that compiling ``model`` on ``inputs`` rewrites every attention site.

    Fails when no site is found, when any site is not rewritten, or, with
    ``expected``, when the number of sites differs (sites are counted per
    compiled graph, so a model whose layers Dynamo inlines has one per layer).
    ``options`` are backend options, ``kwargs`` go to the model's forward.
    Returns the :class:`~attn_inductor.ExplainReport` on success.
    """
    __tracebackhide__ = True  # pytest: point at the caller's line, not at this helper
    report = explain(model, *inputs, options=options, **kwargs)
    problems = rewrite_problems(report, expected)
    if problems:
        raise AssertionError("attn_inductor: " + "; ".join(problems) + "\n" + str(report))
    return report
