"""The only torch.library registration: ``attn_inductor::attention`` and its backward.

Both ops carry the AttentionSpec as a JSON string, so a compiled graph needs no
process-global state to run, and a runtime ``config`` string (implementation
choice, determinism) that is not part of the semantics.  Fake kernels give
shapes only; autograd is registered with ``torch.library.register_autograd``.
No Triton import happens at import time: the implementation is chosen per
call (``_implementation``).

    attention(q, k, v, captured, spec, config) -> (out, lse, lse_fallback)
    attention_backward(q, k, v, out, lse, lse_fallback, grad_out, captured,
                       captured_needs_grad, spec, config) -> (dq, dk, dv, dcaptured)

``lse_fallback`` is empty unless the spec has a soft mask (Note [fully masked
rows]); ``dcaptured[i]`` is an empty tensor where no gradient was asked for.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import torch
from torch import Tensor

from . import _compat
from .lowering.spec import AttentionSpec

IMPLEMENTATIONS = ("auto", "triton", "cpu")


def default_config(**overrides) -> str:
    cfg = {"impl": "auto", "deterministic": False}
    cfg.update(overrides)
    return json.dumps(cfg, sort_keys=True)


@functools.lru_cache(maxsize=64)
def _parse_config(config: str) -> dict:
    """Parsed once per distinct string (every call passes the same few); callers only read it."""
    return json.loads(config) if config else {}


def implementation_name(device: torch.device | str, impl: str = "auto") -> str:
    """Which implementation runs for tensors on ``device``: 'triton', 'triton-interpreter' or 'cpu'."""
    device = torch.device(device)
    if impl == "cpu":
        return "cpu"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and (impl == "triton" or _compat.triton_interpret_enabled()):
        if _compat.triton_available() and _compat.triton_interpret_enabled():
            return "triton-interpreter"
        if impl == "triton":
            raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
    return "cpu"


def _implementation(device: torch.device, config: dict):
    return _implementation_for(device.type, config.get("impl", "auto"), _INTERPRET_ENV())


_INTERPRET_ENV = _compat.env_reader("TRITON_INTERPRET")


@functools.lru_cache(maxsize=None)
def _implementation_for(device_type: str, impl: str, interpret_env: tuple):
    """The module for (device type, impl, TRITON_INTERPRET's value): decided, and imported, once."""
    name = implementation_name(torch.device(device_type), impl)
    if name.startswith("triton"):
        from .templates import launch

        return launch
    from . import cpu

    return cpu


@functools.lru_cache(maxsize=None)
def _runtime():
    from . import runtime

    return runtime


# Note [plain library registration]
#     ``torch.library.custom_op`` wraps the implementation in Python layers that
#     run on every call (an aliasing check over inputs and outputs, a Dynamo
#     disable context).  A cProfile on the H200 host charged ~0.6 ms per call to
#     that wrapper, but defining the ops as below did not lower the measured
#     per-call host time (benchmarks/results/h200_host_overhead.md): the
#     profile's attribution was off, and where the host time of a small
#     attention goes is still open (issue "Fused Triton flash kernel").  The
#     plain definition is kept as the leaner of the two: a schema on a
#     ``torch.library.Library``, one CompositeExplicitAutograd kernel per op, and
#     the same ``register_fake`` / ``register_autograd`` as custom ops;
#     ``torch.library.opcheck`` covers them (tests/test_backend.py).
_lib = torch.library.Library("attn_inductor", "DEF")
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor[] captured, str spec, str config) "
            "-> (Tensor, Tensor, Tensor)")
_lib.define("attention_no_grad(Tensor q, Tensor k, Tensor v, Tensor[] captured, str spec, str config) "
            "-> (Tensor, Tensor, Tensor)")
_lib.define("attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor lse_fallback, "
            "Tensor grad_out, Tensor[] captured, bool[] captured_needs_grad, str spec, str config) "
            "-> (Tensor, Tensor, Tensor, Tensor[])")


def _site_key(spec: str, config: str, q: Tensor, k: Tensor, v: Tensor, captured: Sequence[Tensor]) -> tuple:
    """Everything the runtime's planning reads besides values (Note [call sites] in runtime.py)."""
    return (spec, config, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, tuple((t.shape, t.stride(), t.dtype, t.device) for t in captured),
            _compat.policy_env(), q.dtype == torch.float32 and _compat.fp32_matmul_allows_tf32())


_SITES_MAX = 256
_forward_sites: dict[tuple, Any] = {}  # site key -> runtime.forward_site's function, or False (none)
_backward_sites: dict[tuple, Any] = {}


def _may_have_site(spec: str) -> bool:
    """False for specs that never get a call site (soft masks: host work per call), which then skip
    building the site key."""
    hit = _site_specs.get(spec)
    if hit is None:
        hit = _site_specs[spec] = not AttentionSpec.from_json(spec).has_soft_mask
        while len(_site_specs) > _SITES_MAX:
            _site_specs.pop(next(iter(_site_specs)))
    return hit


_site_specs: dict[str, bool] = {}


def _remember(sites: dict, key: tuple, make_site) -> None:
    """Keep ``make_site()`` (a function, or None: no fast path) for ``key``.  The call it follows has
    already succeeded, so a failure here only costs the fast path (the tests check sites are made)."""
    try:
        site = make_site()
    except Exception:  # noqa: BLE001
        site = None
    sites[key] = site or False
    while len(sites) > _SITES_MAX:
        sites.pop(next(iter(sites)))


def _attention_impl(q: Tensor, k: Tensor, v: Tensor, captured: Sequence[Tensor], spec: str, config: str
                    ) -> tuple[Tensor, Tensor, Tensor]:
    key = _site_key(spec, config, q, k, v, captured) if _may_have_site(spec) else None
    site = _forward_sites.get(key) if key is not None else False
    if site:
        got = site(q, k, v, captured)
        if got is not None:
            return got  # fresh contiguous tensors
    s = AttentionSpec.from_json(spec)
    cfg = _parse_config(config)
    impl = _implementation(q.device, cfg)
    out, lse, lse_fb = _runtime().attention_forward(s, q, k, v, list(captured), impl)
    if site is None:
        _remember(_forward_sites, key, lambda: _runtime().forward_site(s, q, k, v, list(captured), impl))
    # the fake kernel promises contiguous outputs; keep the promise whatever the implementation returned
    return out.contiguous(), lse.contiguous(), lse_fb.contiguous()


def _attention_fake(q, k, v, captured, spec, config):
    s = AttentionSpec.from_json(spec)
    B, Hq, Lq, _ = q.shape
    out = q.new_empty((B, Hq, Lq, v.shape[-1]), dtype=v.dtype)
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    lse_fb = q.new_empty((B, Hq, Lq) if s.has_soft_mask else (0,), dtype=torch.float32)
    return out, lse, lse_fb


def _attention_backward_impl(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lse_fallback: Tensor,
                             grad_out: Tensor, captured: Sequence[Tensor], captured_needs_grad: Sequence[bool],
                             spec: str, config: str) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    key = None
    if _may_have_site(spec):
        key = (*_site_key(spec, config, q, k, v, captured), out.shape, out.stride(), lse.shape, lse.stride(),
               lse_fallback.shape, grad_out.shape, grad_out.stride(), grad_out.dtype, grad_out.device,
               tuple(captured_needs_grad))
    site = _backward_sites.get(key) if key is not None else False
    got = site(q, k, v, out, lse, grad_out, captured) if site else None
    if got is None:
        s = AttentionSpec.from_json(spec)
        cfg = _parse_config(config)
        impl = _implementation(q.device, cfg)
        deterministic = bool(cfg.get("deterministic", False))
        got = _runtime().attention_backward(s, q, k, v, out, lse, lse_fallback, grad_out, list(captured),
                                            list(captured_needs_grad), impl, deterministic=deterministic)
        if site is None:
            _remember(_backward_sites, key, lambda: _runtime().backward_site(
                s, q, k, v, out, lse, grad_out, list(captured), list(captured_needs_grad), impl, deterministic))
    dq, dk, dv, dcap = got
    dcap = [g.contiguous() if g is not None else c.new_empty((0,)) for g, c in zip(dcap, captured)]
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dcap


def _attention_backward_fake(q, k, v, out, lse, lse_fallback, grad_out, captured, captured_needs_grad, spec, config):
    dcap = [c.new_empty(c.shape) if need else c.new_empty((0,)) for c, need in zip(captured, captured_needs_grad)]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dcap


_lib.impl("attention", _attention_impl, "CompositeExplicitAutograd")
_lib.impl("attention_backward", _attention_backward_impl, "CompositeExplicitAutograd")
torch.library.register_fake("attn_inductor::attention", _attention_fake, lib=_lib)
torch.library.register_fake("attn_inductor::attention_backward", _attention_backward_fake, lib=_lib)
attention = torch.ops.attn_inductor.attention.default
attention_backward = torch.ops.attn_inductor.attention_backward.default

# Note [the op in compiled graphs]
#     ``attention`` carries a ``register_autograd`` kernel: every call, grad mode on or not, passes
#     through torch.library's Python autograd wrapper (a pytree walk over the arguments and a
#     redispatch), a few microseconds per call on a fast host and several times that on a loaded GPU
#     host.  In a compiled graph AOT autograd has already split forward from backward, so the graphs
#     Inductor compiles call ``attention_no_grad``, the same kernel with no autograd kernel
#     (``compile_decompositions``, which the backend hands to ``compile_fx``).  Calling it where a
#     gradient is needed raises, as any op without autograd support does.
_lib.impl("attention_no_grad", _attention_impl, "CompositeExplicitAutograd")
torch.library.register_fake("attn_inductor::attention_no_grad", _attention_fake, lib=_lib)
attention_no_grad = torch.ops.attn_inductor.attention_no_grad.default


def compile_decompositions() -> dict:
    """Inductor's decompositions plus ``attention -> attention_no_grad`` (Note [the op in compiled graphs])."""
    from torch._inductor.decomposition import select_decomp_table

    return {**select_decomp_table(), attention: attention_no_grad}


def _setup_context(ctx, inputs, output):
    q, k, v, captured, spec, config = inputs
    out, lse, lse_fb = output
    ctx.save_for_backward(q, k, v, out, lse, lse_fb, *captured)
    ctx.num_captured = len(captured)
    ctx.spec = spec
    ctx.config = config
    ctx.mark_non_differentiable(lse, lse_fb)


def _backward(ctx, grad_out, _grad_lse, _grad_lse_fb):
    q, k, v, out, lse, lse_fb, *captured = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[3]) if isinstance(ctx.needs_input_grad[3], (list, tuple)) else \
        [bool(ctx.needs_input_grad[3])] * len(captured)
    needs = [bool(n) and c.is_floating_point() for n, c in zip(needs, captured)]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dcap = attention_backward(q, k, v, out, lse, lse_fb, grad_out.contiguous(), captured, needs,
                                          ctx.spec, ctx.config)
    dcap = [g if need else None for g, need in zip(dcap, needs)]
    return dq, dk, dv, dcap, None, None


torch.library.register_autograd("attn_inductor::attention", _backward, setup_context=_setup_context, lib=_lib)


def call_attention(q, k, v, captured, spec: AttentionSpec, **config) -> Tensor:
    """Eager convenience wrapper (tests, benchmarks): returns ``out`` only."""
    out, _, _ = torch.ops.attn_inductor.attention(q, k, v, list(captured), spec.to_json(), default_config(**config))
    return out
