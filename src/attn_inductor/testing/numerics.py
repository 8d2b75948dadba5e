"""The project's one numerics rule (flash-attention's): compare against fp64, judged by eager.

A fused kernel reorders the computation, so it cannot be held to bit-equality
with eager; it must not be worse than eager by more than a small factor either.
The bar for ``actual`` is therefore set by ``eager_lowp`` — the same maths done
naively in the input dtype — measured against an fp64 oracle::

    max|actual - ref64|  <=  factor * max|eager_lowp - ref64|  +  atol_floor

on the entries where the oracle is finite.  The floor covers what no
implementation can avoid, scaled by the oracle's largest magnitude: one ulp of
``actual``'s dtype (rounding the exact answer to bf16 costs half of one, which
decides small tensors such as per-head slopes, where eager may round luckily),
and never less than 16 fp32 ulps (the kernel interface keeps lse in fp32, so
fp64 inputs are not held to better than fp32).  Non-finite entries are semantics, not error: NaN must
appear exactly where the oracle has NaN, and ±inf exactly where it has the same
±inf.
"""

from __future__ import annotations

import torch

__all__ = ["assert_close_to_reference", "max_abs_error"]


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in fp64 over the entries where ``ref`` is finite (0.0 if none)."""
    finite = torch.isfinite(ref)
    if not bool(finite.any()):
        return 0.0
    return (x.double() - ref.double())[finite].abs().max().item()


def assert_close_to_reference(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    eager_lowp: torch.Tensor,
    *,
    factor: float = 2.0,
    atol_floor: float | None = None,
    name: str = "tensor",
) -> None:
    """Assert the numerics rule above; messages give both errors and the bar."""
    if actual.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}")
    ref_nan, act_nan = torch.isnan(ref64), torch.isnan(actual)
    if not torch.equal(ref_nan, act_nan):
        extra, missing = int((act_nan & ~ref_nan).sum()), int((ref_nan & ~act_nan).sum())
        raise AssertionError(f"{name}: NaN pattern differs ({extra} unexpected NaN, {missing} missing NaN)")
    ref_inf = torch.isinf(ref64)
    if not torch.equal(actual.double()[ref_inf], ref64.double()[ref_inf]) or bool(
        (torch.isinf(actual) & ~ref_inf).any()
    ):
        raise AssertionError(f"{name}: infinities differ from the reference")
    finite = torch.isfinite(ref64)
    if atol_floor is None:
        scale = max(1.0, ref64.double()[finite].abs().max().item()) if bool(finite.any()) else 1.0
        ulp = max(torch.finfo(actual.dtype).eps if actual.is_floating_point() else 0.0,
                  16 * torch.finfo(torch.float32).eps)
        atol_floor = ulp * scale
    err = max_abs_error(actual, ref64)
    eager_err = max_abs_error(torch.where(torch.isfinite(eager_lowp), eager_lowp.double(), ref64.double()), ref64)
    bar = factor * eager_err + atol_floor
    if not err <= bar:  # also catches err == NaN
        raise AssertionError(
            f"{name}: max abs error {err:.3e} vs fp64 exceeds {factor} x eager's {eager_err:.3e} "
            f"+ floor {atol_floor:.1e} (= {bar:.3e})"
        )
