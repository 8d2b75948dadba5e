"""Block classification against brute force.

The oracle evaluates the predicate densely with ``expr.evaluate`` (eager
semantics) and reduces each tile with all/any over its in-range entries.  Our
map may say PARTIAL where the truth is FULL or EMPTY, never the reverse; for
the index-only and contiguous-document masks below it must be exact.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_inductor.lowering import expr as E
from attn_inductor.masks import intervals
from attn_inductor.masks.block_sparsity import (
    EMPTY,
    FULL,
    PARTIAL,
    classify_blocks,
    clear_block_sparsity_cache,
    describe_block_map,
    get_block_sparsity,
)

I64, BOOL, F32 = E.INT64, E.BOOL, "float32"


def c(v, dtype=I64):
    return E.const(v, dtype)


def call(op, *args, dtype=BOOL):
    return E.call(op, *args, dtype=dtype)


def add(x, k):
    return call("add", x, c(k), dtype=I64)


def sub(x, y):
    return call("sub", x, y, dtype=I64)


q, kv, b, h = E.q_idx, E.kv_idx, E.b, E.h
CAUSAL = call("ge", q, kv)


def sliding_window(w):
    return call("and", call("lt", sub(q, kv), c(w)), CAUSAL)


def prefix_lm(p):
    return call("or", call("lt", kv, c(p)), CAUSAL)


def chunked(size):
    return call("eq", call("floordiv", q, c(size), dtype=I64), call("floordiv", kv, c(size), dtype=I64))


def same_document(buffer=0):
    return call("eq", E.Load(buffer, (q,), I64), E.Load(buffer, (kv,), I64))


def document_ids(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


# ----------------------------------------------------------------------------- oracle


def true_block_map(pred, *, batch, heads, q_len, kv_len, captured, block_m, block_n):
    symbols = E.free_symbols(pred)
    bm = batch if "b" in symbols else 1
    hm = heads if "h" in symbols else 1
    indices = {
        "b": torch.arange(bm).view(-1, 1, 1, 1),
        "h": torch.arange(hm).view(1, -1, 1, 1),
        "q_idx": torch.arange(q_len).view(1, 1, -1, 1),
        "kv_idx": torch.arange(kv_len).view(1, 1, 1, -1),
    }
    dense = E.evaluate(pred, indices, captured).to(torch.bool).expand(bm, hm, q_len, kv_len).to(torch.uint8)
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    pad = (0, nk * block_n - kv_len, 0, nq * block_m - q_len)

    def per_tile(fill, reduce):
        padded = F.pad(dense, pad, value=fill).view(bm, hm, nq, block_m, nk, block_n)
        return reduce(reduce(padded.bool(), dim=5), dim=3)

    out = torch.full((bm, hm, nq, nk), PARTIAL, dtype=torch.int8)
    out[per_tile(1, torch.all)] = FULL
    out[~per_tile(0, torch.any)] = EMPTY
    return out


def assert_sound(ours: torch.Tensor, truth: torch.Tensor):
    assert ours.shape == truth.shape
    wrong_full = (ours == FULL) & (truth != FULL)
    wrong_empty = (ours == EMPTY) & (truth != EMPTY)
    assert not wrong_full.any(), f"FULL claimed wrongly at {wrong_full.nonzero()[:5].tolist()}"
    assert not wrong_empty.any(), f"EMPTY claimed wrongly at {wrong_empty.nonzero()[:5].tolist()}"


def check(pred, *, exact, batch=1, heads=1, q_len, kv_len, captured=(), block_m, block_n):
    args = dict(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, captured=list(captured),
                block_m=block_m, block_n=block_n)
    ours = classify_blocks(pred, device="cpu", **args).block_map()
    truth = true_block_map(pred, **args)
    assert_sound(ours, truth)
    if exact:
        assert torch.equal(ours, truth), f"not tight:\nours\n{ours[0, 0]}\ntruth\n{truth[0, 0]}"
    return ours


def test_oracle_check_can_fail():
    truth = torch.tensor([[[[FULL, EMPTY, PARTIAL]]]], dtype=torch.int8)
    assert_sound(torch.tensor([[[[PARTIAL, PARTIAL, PARTIAL]]]], dtype=torch.int8), truth)
    with pytest.raises(AssertionError, match="FULL claimed wrongly"):
        assert_sound(torch.tensor([[[[FULL, EMPTY, FULL]]]], dtype=torch.int8), truth)
    with pytest.raises(AssertionError, match="EMPTY claimed wrongly"):
        assert_sound(torch.tensor([[[[FULL, EMPTY, EMPTY]]]], dtype=torch.int8), truth)


# ----------------------------------------------------------------------------- exact cases

LENGTHS = [(1, 1), (17, 17), (100, 100), (1000, 1000), (17, 100), (100, 17), (1000, 333)]
BLOCKS = [(16, 16), (64, 32), (128, 128)]


@pytest.mark.parametrize("q_len,kv_len", LENGTHS)
@pytest.mark.parametrize("block_m,block_n", BLOCKS)
def test_index_only_masks_are_exact(q_len, kv_len, block_m, block_n):
    bottom_right = call("ge", add(q, kv_len - q_len), kv)
    for pred in (CAUSAL, bottom_right, sliding_window(50), sliding_window(1), prefix_lm(40),
                 prefix_lm(0), chunked(32), chunked(7), call("not", CAUSAL)):
        check(pred, exact=True, q_len=q_len, kv_len=kv_len, block_m=block_m, block_n=block_n)


def test_causal_picture_is_lower_triangular():
    bs = classify_blocks(CAUSAL, batch=4, heads=8, q_len=512, kv_len=512, captured=[],
                         block_m=128, block_n=128, device="cpu")
    assert bs.block_map().shape == (1, 1, 4, 4)  # no b/h dependence: broadcast
    lines = describe_block_map(bs).splitlines()
    assert lines[:4] == ["░···", "█░··", "██░·", "███░"]
    assert "density 62.5%" in lines[4]


def test_describe_downsamples_without_lying():
    bs = classify_blocks(CAUSAL, batch=1, heads=1, q_len=64 * 16, kv_len=64 * 16, captured=[],
                         block_m=16, block_n=16, device="cpu")
    lines = describe_block_map(bs, max_side=16).splitlines()
    assert len(lines) == 17 and all(len(line) == 16 for line in lines[:16])
    assert lines[0] == "░" + "·" * 15  # each cell covers 4×4 tiles: the diagonal cells are mixed
    assert lines[15] == "█" * 15 + "░"
    assert "downsampled to 16×16" in lines[16]


@pytest.mark.parametrize("q_len,kv_len", [(17, 17), (100, 100), (1000, 1000), (100, 37)])
@pytest.mark.parametrize("block_m,block_n", BLOCKS)
def test_document_ids_are_exact(q_len, kv_len, block_m, block_n):
    n = max(q_len, kv_len)
    gen = torch.Generator().manual_seed(n)
    cuts = torch.randperm(n - 1, generator=gen)[: max(n // 40, 1)].add(1).sort().values.tolist()
    lengths = [e - s for s, e in zip([0] + cuts, cuts + [n])]
    docs = document_ids(lengths)
    for pred in (same_document(), call("and", same_document(), CAUSAL)):
        check(pred, exact=True, q_len=q_len, kv_len=kv_len, captured=[docs], block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (17, 17), (100, 100), (100, 60), (1000, 1000)])
@pytest.mark.parametrize("buffer_dtype", [torch.bool, torch.float32, torch.uint8])
def test_gpt2_causal_buffer_is_exact(q_len, kv_len, buffer_dtype):
    m = 1024  # GPT-2 registers tril(ones(n_positions, n_positions)).view(1, 1, n, n)
    bias = torch.tril(torch.ones(m, m)).to(buffer_dtype).view(1, 1, m, m)
    load = E.Load(0, (c(0), c(0), add(q, kv_len - q_len), kv), E.dtype_name(buffer_dtype))
    pred = load if buffer_dtype == torch.bool else call("ne", load, c(0, E.dtype_name(buffer_dtype)))
    ours = check(pred, exact=True, q_len=q_len, kv_len=kv_len, captured=[bias], block_m=32, block_n=64)
    if q_len == kv_len == 1000:
        assert (ours == EMPTY).any() and (ours == FULL).any()


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (17, 100), (100, 100), (300, 1000)])
def test_padding_mask_depends_on_batch(q_len, kv_len):
    valid = torch.tensor([kv_len, kv_len // 2, 1])
    pad = torch.arange(kv_len)[None, :] < valid[:, None]  # [B, S] True where a real token
    pred = E.Load(0, (b, kv), BOOL)
    ours = check(pred, exact=True, batch=3, heads=4, q_len=q_len, kv_len=kv_len, captured=[pad],
                 block_m=32, block_n=32)
    assert ours.shape[:2] == (3, 1)
    check(call("and", pred, CAUSAL), exact=False, batch=3, heads=4, q_len=q_len, kv_len=kv_len,
          captured=[pad], block_m=32, block_n=32)


def test_head_dependent_window_is_per_head():
    windows = torch.tensor([1, 16, 64, 1000])
    pred = call("and", call("lt", sub(q, kv), E.Load(0, (h,), I64)), CAUSAL)
    ours = check(pred, exact=True, heads=4, q_len=300, kv_len=300, captured=[windows], block_m=16, block_n=16)
    assert ours.shape[:2] == (1, 4)
    assert not torch.equal(ours[0, 0], ours[0, 3])


def test_relative_position_table_uses_overlapping_ranges(monkeypatch):
    # bias[q - kv + L] > 0: ranges overlap across tiles, exercising the sparse table and windows
    n = 200
    table = torch.randn(2 * n, generator=torch.Generator().manual_seed(0))
    table[n - 40: n + 1] = 1.0  # positive for offsets -40..0
    table[n + 1:] = -1.0
    pred = call("gt", E.Load(0, (add(sub(q, kv), n),), F32), c(0.0, F32))
    for budget in (intervals.LOAD_REDUCTION_BUDGET, 2_000, 10):  # windows, sparse table, whole tensor
        monkeypatch.setattr(intervals, "LOAD_REDUCTION_BUDGET", budget)
        ours = classify_blocks(pred, batch=1, heads=1, q_len=n, kv_len=n, captured=[table],
                               block_m=8, block_n=8, device="cpu")
        truth = true_block_map(pred, batch=1, heads=1, q_len=n, kv_len=n, captured=[table], block_m=8, block_n=8)
        assert_sound(ours.block_map(), truth)
        if budget > 10:  # only the whole-tensor fallback may lose the structure
            assert torch.equal(ours.block_map(), truth)


def test_load_reduction_strategies_agree_and_fallback_is_sound():
    table = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    lo = torch.arange(60).view(-1, 1)
    hi = torch.clamp(lo + lo % 30, max=63)  # 60 overlapping ranges of width 1..30
    cols = torch.tensor([7, 0, 49]).view(1, -1)
    zero = torch.zeros((), dtype=torch.bool)
    idx = [intervals.Interval(lo, hi, zero, torch.int64), intervals.Interval(cols, cols, zero, torch.int64)]
    expected_lo = torch.stack([table[l: r + 1].amin(0) for l, r in zip(lo.flatten(), hi.flatten())])[:, cols[0]]
    expected_hi = torch.stack([table[l: r + 1].amax(0) for l, r in zip(lo.flatten(), hi.flatten())])[:, cols[0]]
    # after the point columns: windows cost 60*30*3 = 5400 elements, the sparse table 5*64*3 + 60*3 = 1140
    for budget in (1 << 20, 2000):
        got = intervals.load_bounds(table, idx, budget=budget)
        assert torch.equal(got.lo, expected_lo) and torch.equal(got.hi, expected_hi), budget
    got = intervals.load_bounds(table, idx, budget=10)  # whole-dimension fallback: looser, still sound
    assert (got.lo <= expected_lo).all() and (got.hi >= expected_hi).all()


def test_negative_load_index_wraps_like_eager():
    # doc[q - 1] at q = 0 reads the last element, exactly as eager indexing does
    docs = document_ids([5, 30, 29])
    pred = call("eq", E.Load(0, (add(q, -1),), I64), E.Load(0, (kv,), I64))
    check(pred, exact=False, q_len=64, kv_len=64, captured=[docs], block_m=4, block_n=4)


def test_integer_overflow_is_never_trusted():
    # q * 2**62 wraps in eager; a naive interval would call the first tile FULL
    big = call("mul", q, c(1 << 62), dtype=I64)
    for pred in (call("ge", big, c(0)), call("lt", call("add", big, c(1 << 62), dtype=I64), c(0))):
        check(pred, exact=False, q_len=16, kv_len=4, block_m=8, block_n=4)
    narrow = call("ge", call("to", add(q, 100), dtype="int8"), c(0, "int8"))  # wraps at 128
    check(narrow, exact=False, q_len=64, kv_len=4, block_m=16, block_n=4)


@pytest.mark.parametrize("divisor_sign", [1, -1])
def test_remainder_and_floordiv_by_intervals(divisor_sign):
    # 5 % d for d in 3..6 is 2, 1, 0, 5: a dividend inside one period of the smallest divisor
    # is not inside one period of the others
    divisor = call("mul", add(kv, 3), c(divisor_sign), dtype=I64)
    for op in ("remainder", "floordiv"):
        for dividend in (c(5), add(q, 5), call("neg", add(q, 5), dtype=I64)):
            value = call(op, dividend, divisor, dtype=I64)
            for target in range(-6, 7):
                check(call("eq", value, c(target)), exact=False, q_len=8, kv_len=16, block_m=2, block_n=4)
    period = call("remainder", add(q, 3), c(10 * divisor_sign), dtype=I64)  # within one period per tile
    check(call("lt", period, c(0 if divisor_sign < 0 else 7)), exact=True, q_len=40, kv_len=4, block_m=5,
          block_n=4)


def test_float_to_int_out_of_range_is_never_trusted():
    # float -> int64 past 2**63 is undefined in C; on x86 eager gives INT64_MIN
    huge = call("trunc_to", call("mul", call("to", q, dtype=F32), c(1e19, F32), dtype=F32), dtype=I64)
    for pred in (call("gt", huge, c(0)), call("le", huge, c(0))):
        check(pred, exact=False, q_len=64, kv_len=4, block_m=16, block_n=4)


def test_nan_makes_comparisons_unknown():
    x = call("to", sub(q, kv), dtype=F32)
    nan_where_negative = call("log", x, dtype=F32)  # NaN below the diagonal, -inf on it
    for op in COMPARISON_OPS:
        pred = call(op, nan_where_negative, c(1.0, F32))
        check(pred, exact=False, q_len=40, kv_len=40, block_m=8, block_n=8)


def test_unknown_ops_are_partial_not_wrong():
    pred = call("gt", call("pow", E.call("to", q, dtype=F32), c(2.0, F32), dtype=F32), c(10.0, F32))
    ours = check(pred, exact=False, q_len=32, kv_len=8, block_m=8, block_n=8)
    assert (ours == PARTIAL).all()


def test_long_sequences_are_fast_and_exact():
    n, block = 32768, 128
    docs = document_ids([4096] * 8)
    pred = call("and", same_document(), CAUSAL)
    classify_blocks(pred, batch=1, heads=1, q_len=256, kv_len=256, captured=[docs], block_m=block,
                    block_n=block, device="cpu")  # warm-up
    start = time.perf_counter()
    bs = classify_blocks(pred, batch=2, heads=16, q_len=n, kv_len=n, captured=[docs], block_m=block,
                         block_n=block, device="cpu")
    elapsed = time.perf_counter() - start
    m = bs.block_map()
    # 8 documents of 32 blocks each: a lower triangle of FULL tiles and a PARTIAL diagonal per document
    assert m.shape == (1, 1, 256, 256)
    assert int((m == FULL).sum()) == 8 * 32 * 31 // 2
    assert int((m == PARTIAL).sum()) == 8 * 32
    assert elapsed < 2.0, elapsed


# ----------------------------------------------------------------------------- property test

COMPARISON_OPS = E.COMPARISONS
TABLE_SIZE = 23


def _int_leaves():
    return st.one_of(st.sampled_from([q, kv, b, h]), st.integers(-70, 70).map(c))


def _index_atoms(ints):
    return st.builds(lambda op, x, y: call(op, x, y), st.sampled_from(COMPARISON_OPS), ints, ints)


def _int_exprs():
    def extend(children):
        simple_bool = _index_atoms(_int_leaves())
        return st.one_of(
            st.builds(lambda op, x, y: call(op, x, y, dtype=I64),
                      st.sampled_from(["add", "sub", "minimum", "maximum"]), children, children),
            st.builds(lambda x, k: call("mul", x, c(k), dtype=I64), children, st.integers(-4, 4)),
            st.builds(lambda x, y: call("mul", x, y, dtype=I64), children, children),
            st.builds(lambda op, x, d: call(op, x, c(d), dtype=I64), st.sampled_from(["floordiv", "remainder"]),
                      children, st.integers(1, 40) | st.integers(-40, -1)),
            # divisor is an interval that never holds 0
            st.builds(lambda op, x, y, sign: call(op, x, call("mul", add(call("abs", y, dtype=I64), 1), c(sign),
                                                              dtype=I64), dtype=I64),
                      st.sampled_from(["floordiv", "remainder"]), children, children, st.sampled_from([1, -1])),
            # casts: wrapping to a narrow int, float round trips truncating toward zero
            st.builds(lambda x, dtype: call("to", call("to", x, dtype=dtype), dtype=I64), children,
                      st.sampled_from(["int8", "uint8", "int16", "int32"])),
            st.builds(lambda x, scale, dtype: call("trunc_to", call("mul", call("to", x, dtype=dtype), c(scale, dtype),
                                                                    dtype=dtype), dtype=I64),
                      children, st.sampled_from([0.3, -2.5, 1e17, 1e30]), st.sampled_from([F32, "float16"])),
            st.builds(lambda op, x: call(op, x, dtype=I64), st.sampled_from(["neg", "abs"]), children),
            st.builds(lambda cond, x, y: call("where", cond, x, y, dtype=I64), simple_bool, children, children),
            # a captured int table read at an in-range, wrapped index
            st.builds(lambda x: E.Load(2, (call("remainder", x, c(TABLE_SIZE), dtype=I64),), I64), children),
        )

    return st.recursive(_int_leaves(), extend, max_leaves=6)


def _bool_atoms(ints):
    def float_compare(op, x, scale, dtype, fn, threshold):
        value = call("mul", call("to", x, dtype=dtype), c(scale, dtype), dtype=dtype)
        if fn is not None:
            value = call(fn, value, dtype=dtype)
        return call(op, value, c(threshold, dtype))

    return st.one_of(
        _index_atoms(ints),
        st.just(same_document(0)),
        st.builds(lambda x, y: call("eq", E.Load(0, (x,), I64), E.Load(0, (y,), I64)),
                  st.sampled_from([q, kv, add(q, -1), add(kv, 3)]), st.sampled_from([q, kv, add(kv, -2)])),
        st.just(E.Load(1, (b, kv), BOOL)),
        st.builds(lambda x, y: E.Load(3, (call("remainder", x, c(37), dtype=I64),
                                          call("remainder", y, c(37), dtype=I64)), BOOL), ints, ints),
        st.builds(lambda op, x, t: call(op, E.Load(4, (call("remainder", x, c(TABLE_SIZE), dtype=I64),), F32),
                                        c(t, F32)), st.sampled_from(COMPARISON_OPS), ints,
                  st.sampled_from([-math.inf, -1.0, 0.0, 0.5, math.inf])),
        st.builds(float_compare, st.sampled_from(COMPARISON_OPS), ints, st.sampled_from([0.37, -2.0, 1e30]),
                  st.sampled_from([F32, "float16", "bfloat16"]),
                  st.sampled_from([None, "exp", "log", "sqrt", "tanh", "floor", "abs", "reciprocal"]),
                  st.sampled_from([-1.0, 0.0, 3.5, 17.0])),
    )


def _bool_exprs():
    def extend(children):
        return st.one_of(
            st.builds(lambda op, x, y: call(op, x, y), st.sampled_from(["and", "or", "xor"]), children, children),
            children.map(lambda x: call("not", x)),
            st.builds(lambda cond, x, y: call("where", cond, x, y), children, children, children),
        )

    return st.recursive(_bool_atoms(_int_exprs()), extend, max_leaves=5)


@st.composite
def problems(draw):
    q_len = draw(st.integers(1, 150))
    kv_len = draw(st.integers(1, 150))
    block_m = draw(st.sampled_from([1, 3, 8, 16, 64, 128]) | st.integers(1, 40))
    block_n = draw(st.sampled_from([1, 5, 8, 16, 64, 128]) | st.integers(1, 40))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n = max(q_len, kv_len)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=6)))) if n > 1 else []
    docs = document_ids([e - s for s, e in zip([0] + cuts, cuts + [n])])
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    # padding: each row valid up to a length, or random holes
    if draw(st.booleans()):
        pad = torch.arange(kv_len)[None, :] < torch.randint(0, kv_len + 1, (batch, 1), generator=gen)
    else:
        pad = torch.rand(batch, kv_len, generator=gen) < 0.7
    table = torch.randint(-50, 51, (TABLE_SIZE,), generator=gen)
    buffer = torch.tril(torch.ones(37, 37, dtype=torch.bool), diagonal=draw(st.integers(-5, 5)))
    specials = torch.tensor([-math.inf, -3.0, 0.0, 0.25, 2.0, math.inf, math.nan])
    floats = specials[torch.randint(0, len(specials), (TABLE_SIZE,), generator=gen)]
    captured = [docs, pad, table, buffer, floats]
    pred = draw(_bool_exprs())
    return dict(pred=pred, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, captured=captured,
                block_m=block_m, block_n=block_n)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems())
def test_never_wrong_in_the_unsafe_direction(problem):
    pred = problem.pop("pred")
    try:
        truth = true_block_map(pred, **problem)
    except (RuntimeError, IndexError, ZeroDivisionError):
        return  # eager raises on this predicate (e.g. integer division by zero): nothing to preserve
    ours = classify_blocks(pred, device="cpu", **problem).block_map()
    assert_sound(ours, truth)


@settings(max_examples=60, deadline=None)
@given(q_len=st.integers(1, 300), kv_len=st.integers(1, 300), window=st.integers(1, 300),
       prefix=st.integers(0, 300), chunk=st.integers(1, 100), block_m=st.integers(1, 70), block_n=st.integers(1, 70))
def test_index_only_masks_are_exact_for_any_shape(q_len, kv_len, window, prefix, chunk, block_m, block_n):
    for pred in (CAUSAL, sliding_window(window), prefix_lm(prefix), chunked(chunk)):
        check(pred, exact=True, q_len=q_len, kv_len=kv_len, block_m=block_m, block_n=block_n)


# ----------------------------------------------------------------------------- cache


def _sparsity(pred, captured, **kw):
    args = dict(batch=1, heads=1, q_len=256, kv_len=256, block_m=32, block_n=32, device="cpu")
    args.update(kw)
    return get_block_sparsity(pred, captured=captured, **args)


def test_cache_hits_for_the_same_object_and_predicate():
    clear_block_sparsity_cache()
    docs = document_ids([100, 156])
    first = _sparsity(same_document(), [docs])
    assert _sparsity(same_document(), [docs]) is first
    assert _sparsity(CAUSAL, []) is _sparsity(CAUSAL, [])
    assert _sparsity(same_document(), [docs], q_len=128) is not first  # every argument is part of the key


def test_cache_sees_in_place_mutation():
    clear_block_sparsity_cache()
    docs = document_ids([128, 128])
    before = _sparsity(same_document(), [docs]).block_map()
    docs[64:] = 7  # version bump
    after = _sparsity(same_document(), [docs]).block_map()
    assert not torch.equal(before, after)
    assert torch.equal(after, true_block_map(same_document(), batch=1, heads=1, q_len=256, kv_len=256,
                                             captured=[docs], block_m=32, block_n=32))


def test_cache_misses_for_a_new_tensor_even_at_a_reused_address():
    clear_block_sparsity_cache()
    contents = [torch.zeros(256, dtype=torch.int64), document_ids([32] * 8)]
    expected = [true_block_map(same_document(), batch=1, heads=1, q_len=256, kv_len=256, captured=[docs],
                               block_m=32, block_n=32) for docs in contents]
    dead_ids, reused = set(), 0
    for step in range(40):
        # alternate contents in tensors of the same shape, strides, dtype and version 0:
        # once an id is reused, only the object's identity tells them apart
        docs = contents[step % 2].clone()
        reused += id(docs) in dead_ids
        assert torch.equal(_sparsity(same_document(), [docs]).block_map(), expected[step % 2])
        dead_ids.add(id(docs))
        del docs
    if not reused:
        pytest.skip("the allocator never reused a freed tensor's id here")


def test_cache_sees_new_tensor_objects():
    clear_block_sparsity_cache()
    first = _sparsity(same_document(), [document_ids([256])]).block_map()
    second = _sparsity(same_document(), [document_ids([128, 128])]).block_map()
    assert (first == FULL).all() and not torch.equal(first, second)


def test_cache_is_bounded_and_clearable():
    from attn_inductor.masks import block_sparsity

    clear_block_sparsity_cache()
    for w in range(200):
        _sparsity(sliding_window(w), [])
    assert len(block_sparsity._cache) <= block_sparsity._CACHE_SIZE
    clear_block_sparsity_cache()
    assert len(block_sparsity._cache) == 0


# ----------------------------------------------------------------------------- Note [changing mask tensors]


def _padded_causal():
    """HF's padding mask as the matcher recovers it: causal & attention_mask[b, kv_idx] != 0."""
    return call("and", CAUSAL, call("ne", E.Load(0, (b, kv), I64), c(0)))


def _padding(batch, kv_len, pads):
    m = torch.ones(batch, kv_len, dtype=torch.int64)
    for i, p in enumerate(pads):
        if p:
            m[i, :p] = 0  # left padding
    return m


def _sound(bs, pred, captured, **args):
    """FULL and EMPTY only where the brute-force truth says so (PARTIAL is always allowed)."""
    truth = true_block_map(pred, captured=captured, **args).expand(args["batch"], args["heads"], -1, -1)
    got = bs.block_map().expand_as(truth)
    assert bool(((got == PARTIAL) | (got == truth)).all())


def test_padding_and_document_masks_classified_without_host_reads(monkeypatch):
    """Loads at plain indices (``pad[b, kv_idx]``, ``doc[q_idx]``) are bounded per tile by device ops
    alone (``intervals._tile_load_bounds``): every new tensor is classified exactly, and the general
    ``load_bounds`` (which syncs) is never called."""
    clear_block_sparsity_cache()

    def no_reads(*a, **k):
        raise AssertionError("load_bounds (host syncs) was used for a load at plain indices")

    monkeypatch.setattr(intervals, "load_bounds", no_reads)
    args = dict(batch=2, heads=1, q_len=128, kv_len=120, block_m=32, block_n=32)
    pred = _padded_causal()
    for pads in ([40, 0], [0, 100], [33, 7]):
        padding = _padding(2, 120, pads)
        got = get_block_sparsity(pred, captured=[padding], device="cpu", on_change="unknown_loads", **args)
        assert torch.equal(got.block_map(), true_block_map(pred, captured=[padding], **args)), pads
    assert (got.block_map()[0, 0, :, 0] == EMPTY).all()  # keys 0..32 padded in row 0: never visited
    bool_pad = _padding(2, 120, [50, 0]).bool()
    bool_pred = call("and", CAUSAL, E.Load(0, (b, kv), BOOL))
    assert torch.equal(classify_blocks(bool_pred, captured=[bool_pad], device="cpu", **args).block_map(),
                       true_block_map(bool_pred, captured=[bool_pad], **args))
    for lengths in ([100, 28], [1, 127], [64, 64]):
        docs = document_ids(lengths)
        args1 = dict(args, batch=1, kv_len=128)
        got = get_block_sparsity(same_document(), captured=[docs], device="cpu", on_change="unknown_loads", **args1)
        assert torch.equal(got.block_map(), true_block_map(same_document(), captured=[docs], **args1)), lengths
    # a float table with NaN: that tile's bounds are unknown, never a wrong FULL/EMPTY
    scores = torch.zeros(128)
    scores[70] = math.nan
    gt = call("gt", E.Load(0, (kv,), F32), E.const(-1.0, F32))
    args1 = dict(args, batch=1, kv_len=128)
    got = classify_blocks(gt, captured=[scores], device="cpu", **args1).block_map()
    assert (got[..., 2] == PARTIAL).all() and (got[..., [0, 1, 3]] == FULL).all()


def _gathered_band():
    """A load that is not at plain indices: allowed[q_idx - kv_idx + 127] (a banded table)."""
    return call("and", CAUSAL, E.Load(0, (add(sub(q, kv), 127),), BOOL))


def test_changing_gathered_mask_tensors_stop_reading_values(monkeypatch):
    """``on_change="unknown_loads"`` for loads that need ``load_bounds``: the first tensor at a call site
    is classified exactly; once the site sees another, its misses use a map with every load unknown (no
    tensor read), the same object each time; the first tensor still hits its exact entry."""
    clear_block_sparsity_cache()
    pred = _gathered_band()
    args = dict(batch=1, heads=1, q_len=128, kv_len=128, block_m=32, block_n=32)

    def band(width):
        return torch.arange(255) - 127 < width

    first = band(40)
    exact = get_block_sparsity(pred, captured=[first], device="cpu", on_change="unknown_loads", **args)
    assert torch.equal(exact.block_map(), true_block_map(pred, captured=[first], **args))

    def no_reads(*a, **k):
        raise AssertionError("a loads-unknown classification read a captured tensor")

    monkeypatch.setattr(intervals, "load_bounds", no_reads)
    later = [get_block_sparsity(pred, captured=[band(w)], device="cpu", on_change="unknown_loads", **args)
             for w in (10, 100, 33)]
    assert later[0] is later[1] is later[2]  # stable: plans holding these tables are reused
    nq = later[0].block_map().shape[-1]
    upper = torch.ones(nq, nq, dtype=torch.bool).triu(1)
    assert (later[0].block_map()[0, 0][upper] == EMPTY).all()
    assert (later[0].block_map()[0, 0][~upper] == PARTIAL).all()
    for w in (10, 100, 33):
        _sound(later[0], pred, [band(w)], **args)
    assert get_block_sparsity(pred, captured=[first], device="cpu", on_change="unknown_loads", **args) is exact
    # the default (explain, and the tests above) stays exact for every tensor
    monkeypatch.undo()
    other = band(70)
    assert torch.equal(get_block_sparsity(pred, captured=[other], device="cpu", **args).block_map(),
                       true_block_map(pred, captured=[other], **args))


def test_inference_tensors():
    """An inference tensor has no version counter, so it is never cached: plain-index loads are classified
    exactly every call; a gathered load exactly on the site's first call, with loads unknown later."""
    clear_block_sparsity_cache()
    args = dict(batch=1, heads=1, q_len=96, kv_len=96, block_m=32, block_n=32)
    with torch.inference_mode():
        docs = document_ids([32, 64])
        allowed = torch.arange(255) - 127 < 20
    for _ in range(2):
        got = get_block_sparsity(same_document(), captured=[docs], device="cpu", on_change="unknown_loads", **args)
        assert torch.equal(got.block_map(), true_block_map(same_document(), captured=[docs], **args))
    pred = _gathered_band()
    exact = get_block_sparsity(pred, captured=[allowed], device="cpu", on_change="unknown_loads", **args)
    assert torch.equal(exact.block_map(), true_block_map(pred, captured=[allowed], **args))
    again = get_block_sparsity(pred, captured=[allowed], device="cpu", on_change="unknown_loads", **args)
    assert again is not exact and not bool((again.block_map() == FULL).any())
    _sound(again, pred, [allowed], **args)
    with pytest.raises(ValueError, match="on_change"):
        get_block_sparsity(same_document(), captured=[docs], device="cpu", on_change="sometimes", **args)


def test_no_mask_is_dense_full():
    bs = get_block_sparsity(None, batch=2, heads=2, q_len=100, kv_len=70, captured=[], block_m=32, block_n=32,
                            device="cpu")
    assert (bs.block_map() == FULL).all() and bs.block_map().shape == (1, 1, 4, 3)


# ----------------------------------------------------------------------------- closed-form kv bounds

from attn_inductor.masks import bounds as kvb  # noqa: E402


def _truth(pred, q_len, kv_len):
    qq, kk = torch.arange(q_len).view(-1, 1), torch.arange(kv_len).view(1, -1)
    return E.evaluate(pred, {"q_idx": qq, "kv_idx": kk}).broadcast_to(q_len, kv_len)


def _tile_truth(truth, block_m, block_n):
    nq, nk = -(-truth.shape[0] // block_m), -(-truth.shape[1] // block_n)
    out = torch.full((nq, nk), PARTIAL, dtype=torch.int8)
    for i in range(nq):
        for j in range(nk):
            tile = truth[i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n]
            out[i, j] = FULL if bool(tile.all()) else EMPTY if not bool(tile.any()) else PARTIAL
    return out


def _check_bounds(pred, q_len, kv_len, block_m, block_n, exact=True):
    """lo(q) <= kv < hi(q) equals the predicate; both walks are sound, and exact for gap-free masks."""
    iv = kvb.kv_interval(pred)
    assert iv is not None, E.format_expr(pred)
    truth = _truth(pred, q_len, kv_len)
    qq, kk = torch.arange(q_len).view(-1, 1), torch.arange(kv_len).view(1, -1)
    lo, hi = E.evaluate(iv.lo, {"q_idx": qq}), E.evaluate(iv.hi, {"q_idx": qq})
    assert torch.equal((kk >= lo) & (kk < hi), truth)
    want = _tile_truth(truth, block_m, block_n)
    for backward in (False, True):
        walked = kvb.walk_block_map(iv, q_len, kv_len, block_m, block_n, backward=backward)
        assert not bool(((walked == EMPTY) & (want != EMPTY)).any()), "an EMPTY tile holds entries"
        assert not bool(((walked == FULL) & (want != FULL)).any()), "a FULL tile holds masked entries"
        if exact:
            assert torch.equal(walked, want)


@pytest.mark.parametrize("pred,expected", [
    (CAUSAL, "0 <= kv_idx < q_idx + 1"),
    (call("le", sub(kv, q), c(0)), "0 <= kv_idx < q_idx + 1"),                   # kv_idx - q_idx <= 0
    (call("lt", sub(kv, q), c(1)), "0 <= kv_idx < q_idx + 1"),
    (call("not", call("lt", q, kv)), "0 <= kv_idx < q_idx + 1"),
    (call("ge", add(q, 37), kv), "0 <= kv_idx < q_idx + 38"),                    # causal, Lk = Lq + 37
    (sliding_window(5), "q_idx - 4 <= kv_idx < q_idx + 1"),
    (call("le", call("abs", sub(q, kv), dtype=I64), c(3)), "q_idx - 3 <= kv_idx < q_idx + 4"),
    (prefix_lm(6), "0 <= kv_idx < max(6, q_idx + 1)"),
    (chunked(8), "q_idx // 8 * 8 <= kv_idx < (q_idx // 8 + 1) * 8"),
    (call("ge", kv, q), "q_idx <= kv_idx < 1073741824"),                         # anti-causal
    (call("le", call("to", kv, dtype=E.INT32), call("to", q, dtype=E.INT32)), "0 <= kv_idx < q_idx + 1"),
])
def test_closed_form_bounds_recognised(pred, expected):
    iv = kvb.kv_interval(pred)
    assert iv is not None and iv.describe() == expected
    _check_bounds(pred, 45, 61, 16, 16)


@pytest.mark.parametrize("pred,why", [
    (call("ne", q, kv), "!= is not an interval"),
    (call("ge", kv, call("neg", q, dtype=I64)), "a decreasing bound"),
    (call("and", CAUSAL, call("lt", q, c(100))), "a condition on q alone"),
    (call("and", CAUSAL, call("lt", h, c(2))), "depends on the head"),
    (same_document(), "reads a tensor"),
    (call("or", call("lt", kv, c(3)), call("ge", kv, q)), "a union with a gap"),
    (call("lt", call("to", kv, dtype="uint8"), c(10, "uint8")), "uint8 wraps every 256 keys"),
    (call("le", kv, call("to", q, dtype="int8")), "an int8 bound wraps"),
])
def test_closed_form_bounds_refused(pred, why):
    assert kvb.kv_interval(pred) is None, why


def test_closed_form_bounds_with_gaps_stay_sound():
    """kv == 2 q is an exact interval per row, but rows skip columns: tiles in the gaps are walked as PARTIAL."""
    _check_bounds(call("eq", kv, call("mul", q, c(2), dtype=I64)), 40, 90, 8, 16, exact=False)


@settings(max_examples=80, deadline=None)
@given(q_len=st.integers(1, 200), kv_len=st.integers(1, 200), window=st.integers(1, 200),
       offset=st.integers(-50, 50), prefix=st.integers(0, 200), chunk=st.integers(1, 64),
       block_m=st.sampled_from([1, 3, 16, 32, 64]), block_n=st.sampled_from([1, 5, 16, 32, 64]))
def test_closed_form_walks_for_any_shape(q_len, kv_len, window, offset, prefix, chunk, block_m, block_n):
    shifted = call("ge", add(q, offset), kv)
    for pred in (CAUSAL, shifted, call("and", shifted, call("lt", sub(add(q, offset), kv), c(window))),
                 prefix_lm(prefix), chunked(chunk), call("ge", kv, q)):
        _check_bounds(pred, q_len, kv_len, block_m, block_n)


def test_rows_live_on_the_diagonal():
    """Rows that cannot be fully masked skip the NaN-row bookkeeping (runtime._rows_always_live): besides
    index-only masks checked exactly, any mask that holds on the diagonal whatever its loads read (a
    document mask) is proven live symbolically when Lq <= Lk; padding, float-valued ids (NaN != NaN) and
    anti-causal masks are not."""
    from attn_inductor import runtime

    causal = E.call("ge", E.q_idx, E.kv_idx, dtype=E.BOOL)

    def same(dtype):
        return E.call("eq", E.Load(0, (E.q_idx,), dtype), E.Load(0, (E.kv_idx,), dtype), dtype=E.BOOL)

    document = E.and_(causal, same(E.INT64))
    padding = E.and_(causal, E.call("ne", E.Load(0, (E.b, E.kv_idx), E.INT64), E.const(0, E.INT64), dtype=E.BOOL))
    assert runtime._live_on_diagonal(document) and runtime._live_on_diagonal(same(E.INT64))
    assert runtime._live_on_diagonal(E.call("or", padding, same(E.INT64), dtype=E.BOOL))
    assert not runtime._live_on_diagonal(padding)
    assert not runtime._live_on_diagonal(same("float32"))
    assert not runtime._live_on_diagonal(E.call("lt", E.q_idx, E.kv_idx, dtype=E.BOOL))
    # the masked_fill spelling of bench_attention's document variant: the negation of what is dropped
    dropped = E.call("or", E.call("lt", E.q_idx, E.kv_idx, dtype=E.BOOL),
                     E.call("ne", E.Load(0, (E.q_idx,), E.INT64), E.Load(0, (E.kv_idx,), E.INT64), dtype=E.BOOL),
                     dtype=E.BOOL)
    assert runtime._live_on_diagonal(E.Call("not", (dropped,), E.BOOL))
    assert not runtime._live_on_diagonal(dropped)
    assert not runtime._live_on_diagonal(E.Call("not", (E.call("and", causal, same(E.INT64), dtype=E.BOOL),),
                                                E.BOOL))
    float_ne = E.call("ne", E.Load(0, (E.q_idx,), "float32"), E.Load(0, (E.kv_idx,), "float32"), dtype=E.BOOL)
    assert not runtime._live_on_diagonal(E.Call("not", (float_ne,), E.BOOL))  # NaN ids: NaN != NaN
    assert runtime._rows_always_live(document, 64, 64, "cpu")
    assert not runtime._rows_always_live(document, 65, 64, "cpu")  # row 64 has no diagonal entry
    assert not runtime._rows_always_live(padding, 64, 64, "cpu")
    # the claim itself, brute force: every row of a random document mask keeps an entry
    doc = torch.randint(0, 5, (64,)).sort().values
    keep = E.evaluate(document, {"q_idx": torch.arange(64).view(-1, 1), "kv_idx": torch.arange(64).view(1, -1)},
                      [doc])
    assert bool(keep.any(-1).all())


def test_caches_are_bypassed_while_a_cuda_graph_pool_is_active(monkeypatch):
    """Note [CUDA graphs]: while Inductor's CUDA graph trees warm up or record (read from their manager,
    private API, here faked), sparsity is classified afresh and nothing is cached; otherwise the cache
    answers with the very object it returned before."""
    import torch._inductor.cudagraph_trees as trees

    from attn_inductor import _compat
    from attn_inductor.masks import block_sparsity as bs

    class Manager:
        in_warmup, in_recording = True, False

    class Container:
        tree_manager = Manager()

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    containers = trees.get_obj(trees.local, "tree_manager_containers")
    monkeypatch.setitem(containers, 0, Container())
    cuda0 = torch.device("cuda", 0)
    assert _compat.cuda_graph_pool_active(cuda0) and not _compat.cuda_graph_pool_active(torch.device("cpu"))
    Manager.in_warmup = False
    assert not _compat.cuda_graph_pool_active(cuda0)
    Manager.in_recording = True
    assert _compat.cuda_graph_pool_active(cuda0)

    # the cache's behaviour, with the pool test pointed at this CPU run
    doc = torch.tensor([0] * 40 + [1] * 24)
    pred = E.call("eq", E.Load(0, (E.q_idx,), E.INT64), E.Load(0, (E.kv_idx,), E.INT64), dtype=E.BOOL)
    kw = dict(batch=1, heads=1, q_len=64, kv_len=64, captured=[doc], block_m=16, block_n=16, device="cpu")
    bs.clear_block_sparsity_cache()
    monkeypatch.setattr(_compat, "cuda_graph_pool_active", lambda device: True)
    first, second = bs.get_block_sparsity(pred, **kw), bs.get_block_sparsity(pred, **kw)
    assert first is not second and not bs._cache
    assert torch.equal(first.block_map(), second.block_map())
    monkeypatch.setattr(_compat, "cuda_graph_pool_active", lambda device: False)
    third = bs.get_block_sparsity(pred, **kw)
    assert bs.get_block_sparsity(pred, **kw) is third and torch.equal(third.block_map(), first.block_map())
