"""The IR's derivative simplification and the float range analysis used by the backward."""

from __future__ import annotations

import random

import torch

from attn_inductor.lowering import expr as E

F32 = "float32"


def _softcap(cap: float):
    t = E.call("tanh", E.call("truediv", E.score, E.const(cap, F32), dtype=F32), dtype=F32)
    return E.call("mul", t, E.const(cap, F32), dtype=F32)


def test_softcap_derivative_constants_cancel():
    """d/ds cap * tanh(s / cap) = 1 - tanh^2: the chain rule's 1/cap and cap fold into one constant, which
    rounds to 1 in fp32 and disappears."""
    g = E.diff(_softcap(50.0), E.score)
    assert E.format_expr(g) == "1 - tanh(score / 50) * tanh(score / 50)"
    s = torch.linspace(-400, 400, 1001, dtype=torch.float64)
    want = 1 - torch.tanh(s / 50) ** 2
    got = E.evaluate(g, {}, [], score_value=s.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_folded_constant_is_rounded_once():
    g = E.diff(E.call("mul", E.call("mul", E.score, E.const(0.1, F32), dtype=F32), E.const(3.0, F32), dtype=F32),
               E.score)
    assert E.is_const(g) and g.value == torch.tensor(0.1 * 3.0, dtype=torch.float32).item()


def test_float_range_recognised_and_refused():
    assert E.float_range(E.diff(_softcap(30.0), E.score)) == (0.0, 2.0)
    assert E.float_range(E.score) is None
    assert E.float_range(E.call("mul", E.score, E.score, dtype=F32)) is None
    assert E.float_range(E.call("exp", E.call("tanh", E.score, dtype=F32), dtype=F32)) is None  # no rule: refused
    assert E.float_range(E.Load(0, (E.h,), F32)) is None


def test_float_range_is_sound_on_random_expressions():
    """Every value of a random bounded expression, on scores from -1e4 to 1e4, lies in its range."""
    rnd = random.Random(0)
    s = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.randn(2000) * 3]).double()

    def leaf():
        return rnd.choice([E.call("tanh", E.call("mul", E.score, E.const(rnd.uniform(-2, 2), F32), dtype=F32),
                                  dtype=F32),
                           E.call("sigmoid", E.score, dtype=F32), E.const(rnd.uniform(-5, 5), F32),
                           E.call("cos", E.score, dtype=F32)])

    def build(depth):
        if depth == 0:
            return leaf()
        op = rnd.choice(["add", "sub", "mul", "neg", "abs", "where"])
        if op in ("neg", "abs"):
            return E.call(op, build(depth - 1), dtype=F32)
        if op == "where":
            cond = E.call("gt", E.score, E.const(0.0, F32), dtype=E.BOOL)
            return E.call("where", cond, build(depth - 1), build(depth - 1), dtype=F32)
        return E.call(op, build(depth - 1), build(depth - 1), dtype=F32)

    for _ in range(200):
        e = build(rnd.randint(0, 3))
        r = E.float_range(e)
        assert r is not None, E.format_expr(e)
        vals = E.evaluate(e, {}, [], score_value=s)
        vals = torch.broadcast_to(torch.as_tensor(vals, dtype=torch.float64), s.shape).double()
        slack = 1e-5 * max(1.0, abs(r[0]), abs(r[1]))
        assert float(vals.min()) >= r[0] - slack and float(vals.max()) <= r[1] + slack, (E.format_expr(e), r)


def test_specs_share_canonical_expressions():
    """A spec parsed from its JSON (what the op does at run time) holds the very expression objects of
    an equal spec built at compile time, so caches keyed by expressions stop at identity; equality of
    distinct equal trees still holds, and differing hashes answer False without walking the trees."""
    from attn_inductor.lowering.spec import AttentionSpec

    def mask():
        return E.and_(E.call("ge", E.q_idx, E.kv_idx, dtype=E.BOOL),
                      E.call("eq", E.Load(0, (E.q_idx,), E.INT64), E.Load(0, (E.kv_idx,), E.INT64), dtype=E.BOOL))

    a, b = mask(), mask()
    assert a is not b and a == b and hash(a) == hash(b)
    assert a != E.and_(E.call("ge", E.q_idx, E.kv_idx, dtype=E.BOOL), E.call("gt", E.q_idx, E.const(3, E.INT64),
                                                                          dtype=E.BOOL))
    built = AttentionSpec(score_live=E.score, mask=mask(), scale=0.5, num_captured=1)
    parsed = AttentionSpec.from_json(built.to_json())
    assert parsed == built and parsed.mask is built.mask and parsed.live_mask is built.live_mask
