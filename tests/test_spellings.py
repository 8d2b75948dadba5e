"""Every spelling in tests/spellings.py: rewritten (explain + counter) with eager numerics and gradients,
or refused with its exact reason.

The rewritten graph runs without Inductor code generation here (``inductor=False``) to keep the suite
fast on 2 cores; tests/test_backend.py covers the same op under ``compile_fx``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attn_inductor
from attn_inductor.backend import make_backend
from attn_inductor.testing.numerics import assert_close_to_reference

from .spellings import CASES, Case

PARAMS = [pytest.param(c, dt, id=f"{c.name}-{str(dt).replace('torch.', '')}") for c in CASES for dt in c.dtypes]


def _to64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _grad_inputs(inputs):
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().clone().requires_grad_(True)
        out.append(x)
    return out


def _run(mod, inputs, weight):
    out = mod(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    loss = (out.double() * weight).sum()
    loss.backward()
    grads = [x.grad for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads += [p.grad for p in mod.parameters()]
    return out, grads


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_spelling(case: Case, dtype):
    torch.manual_seed(0)
    mod, inputs = case.make(dtype)
    report = attn_inductor.explain(mod, *inputs)
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]

    if case.refuse is not None:
        assert not site.rewritten, str(report)
        assert case.refuse in site.reason, str(report)
        return

    assert site.rewritten, str(report)
    if case.score is not None:
        assert site.score == case.score, str(report)
    if case.mask is not None:
        assert site.mask == case.mask, str(report)
    assert site.gqa_group == case.gqa, str(report)

    before = torch._dynamo.utils.counters["attn_inductor"]["rewritten"]
    compiled = torch.compile(mod, backend=make_backend({"inductor": False}))
    with torch.no_grad():
        first = compiled(*inputs)
    assert torch._dynamo.utils.counters["attn_inductor"]["rewritten"] == before + 1

    # forward + backward against the fp64 oracle, judged by eager in the input dtype
    ref_mod = copy.deepcopy(mod).double()
    eager_mod = copy.deepcopy(mod)
    x_ours = _grad_inputs(inputs)
    x_ref = _grad_inputs([_to64(x) for x in inputs])
    x_eager = _grad_inputs(inputs)
    first_out = first[0] if isinstance(first, tuple) else first
    weight = torch.randn(first_out.shape, dtype=torch.float64)
    out, g_ours = _run(compiled, x_ours, weight)
    ref, g_ref = _run(ref_mod, x_ref, weight)
    eager, g_eager = _run(eager_mod, x_eager, weight)
    assert_close_to_reference(out, ref, eager, name="out")
    if case.grads:
        assert len(g_ours) == len(g_ref)
        for i, (a, r, e) in enumerate(zip(g_ours, g_ref, g_eager)):
            assert a is not None, f"gradient {i} missing"
            assert_close_to_reference(a, r, e, name=f"grad[{i}]")


def test_supported_patterns_page_is_current():
    """docs/supported-patterns.md is generated from this catalogue; regenerate it when a case changes."""
    from pathlib import Path

    from .spellings import render_markdown

    page = Path(__file__).resolve().parent.parent / "docs" / "supported-patterns.md"
    assert page.read_text().strip() == render_markdown().strip(), \
        "docs/supported-patterns.md is stale: run `python -m tests.spellings > docs/supported-patterns.md`"
