"""``python -m attn_inductor check module:factory``: the CI gate for a whole model.

``factory()`` returns ``(model, example_inputs)``; inputs are a tuple of
positional arguments (a lone tensor is accepted) or a dict of keyword
arguments.  The factory is named ``package.module:function`` (imported from
``sys.path``, the current directory included) or ``path/to/file.py:function``.

The check:

1. prints the explain table (every attention site, rewritten or not and why);
2. runs the model eagerly, then compiled with ``backend="flexattn"``, and
   compares every floating-point output with ``allclose`` at a tolerance set
   by the output's dtype (``--atol``/``--rtol`` override); NaN must match NaN,
   other tensors must be equal;
3. writes ``--json``: the explain JSON with ``expected``, ``numerics`` and
   ``verdict`` added;
4. ends with one line, ``attn_inductor check: PASS ...`` or ``... FAIL ...``.

Exit status: 0 pass; 1 a site was not rewritten, no site was found or the
count differs from ``--expect``; 3 every site was rewritten but outputs differ
from eager; 2 usage errors (bad arguments, factory not found or failing).
A miss is reported as 1 even when numerics failed too (the JSON has both).

The model is used as the factory returns it: put it in ``eval()`` there if
dropout should be off.  Numerics are forward outputs only.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import traceback
from typing import Any

import torch

EXIT_OK, EXIT_MISS, EXIT_USAGE, EXIT_NUMERICS = 0, 1, 2, 3

#: (atol, rtol) for compiled-vs-eager outputs: a fused kernel reorders sums, so bit equality
#: is not the bar; these allow a few ulps of the dtype accumulated over a few layers.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


class UsageError(Exception):
    pass


# ----------------------------------------------------------------------------- loading


def load_factory(spec: str):
    """Resolve ``module:function`` or ``path/to/file.py:function`` to the callable."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"expected module:factory or path/to/file.py:factory, got {spec!r}")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise UsageError(f"no such file: {target}")
        name = "_attn_inductor_factory_" + os.path.splitext(os.path.basename(path))[0]
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        if os.path.dirname(path) not in sys.path:
            sys.path.insert(0, os.path.dirname(path))  # so the file can import its neighbours
        mod_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # what ``python -m`` does; the console script does not
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UsageError(f"cannot import {target!r}: {exc}") from exc
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise UsageError(f"{target} has no attribute {attr!r}") from None
    if not callable(factory):
        raise UsageError(f"{spec} is not callable")
    return factory


def call_factory(factory) -> tuple[Any, tuple, dict]:
    """``factory()`` → (model, args, kwargs)."""
    result = factory()
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise UsageError(f"the factory must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    if isinstance(inputs, torch.Tensor):
        return model, (inputs,), {}
    if isinstance(inputs, dict):
        return model, (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return model, tuple(inputs), {}
    raise UsageError(f"example_inputs must be a tuple, a dict or a tensor, got {type(inputs).__name__}")


# ----------------------------------------------------------------------------- numerics


def tolerance_for(dtype: torch.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    d_atol, d_rtol = DEFAULT_TOLERANCES.get(dtype, (1e-4, 1e-4))
    return (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)


def compare_outputs(actual, expected, *, atol: float | None = None, rtol: float | None = None) -> dict:
    """Compare two output pytrees leaf by leaf; a JSON-able dict with ``ok`` and per-leaf results.

    Leaves that are neither tensors nor plain values (a Hugging Face ``DynamicCache``, say) are
    opened up: the tensors among their attributes are compared (``output['past_key_values'].layers[0].keys``).
    """
    from torch.utils._pytree import keystr, tree_flatten_with_path

    exp_leaves, exp_spec = tree_flatten_with_path(expected)
    act_leaves, act_spec = tree_flatten_with_path(actual)
    result: dict = {"ok": True, "max_abs_err": 0.0, "outputs": []}
    if exp_spec != act_spec:
        result.update(ok=False, error=f"output structure differs: eager {exp_spec} vs compiled {act_spec}")
        return result
    pairs = []
    for (path, e), (_, a) in zip(exp_leaves, act_leaves):
        pairs.extend(_open_up("output" + keystr(path), a, e))
    for name, a, e in pairs:
        entry = _compare_leaf(name, a, e, atol, rtol)
        if "max_abs_err" in entry:
            result["max_abs_err"] = max(result["max_abs_err"], entry["max_abs_err"])
        result["outputs"].append(entry)
        result["ok"] = result["ok"] and entry["ok"]
    return result


_PLAIN = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _open_up(name: str, a, e, depth: int = 0):
    """(name, actual, expected) pairs: tensors and plain values as they are, other objects by attribute."""
    if isinstance(e, (torch.Tensor,) + _PLAIN) or depth > 4:
        return [(name, a, e)]
    if isinstance(e, (list, tuple)) and isinstance(a, (list, tuple)) and len(a) == len(e):
        return [p for i, (x, y) in enumerate(zip(a, e)) for p in _open_up(f"{name}[{i}]", x, y, depth + 1)]
    if isinstance(e, dict) and isinstance(a, dict) and a.keys() == e.keys():
        return [p for k in e for p in _open_up(f"{name}[{k!r}]", a[k], e[k], depth + 1)]
    if hasattr(e, "__dict__") and type(a) is type(e):
        pairs = [p for k, v in vars(e).items() if not k.startswith("__")
                 for p in _open_up(f"{name}.{k}", getattr(a, k, None), v, depth + 1)]
        tensor_pairs = [p for p in pairs if isinstance(p[2], torch.Tensor)]
        if tensor_pairs:
            return tensor_pairs
    return [(name, a, e)]


def _compare_leaf(name: str, a, e, atol, rtol) -> dict:
    entry: dict = {"name": name}
    if not isinstance(e, torch.Tensor):
        if isinstance(e, _PLAIN):
            entry.update(ok=_same_value(a, e), kind=type(e).__name__)
        else:  # an object with no tensors in it: nothing numeric to compare
            entry.update(ok=type(a) is type(e), kind=type(e).__name__, note="not compared (no tensors inside)")
    elif not isinstance(a, torch.Tensor) or a.shape != e.shape or a.dtype != e.dtype:
        entry.update(ok=False, error=f"eager {_describe(e)} vs compiled {_describe(a)}")
    elif e.is_floating_point() or e.is_complex():
        t_atol, t_rtol = tolerance_for(e.dtype, atol, rtol)
        a64, e64 = a.detach().cpu().to(torch.complex128 if e.is_complex() else torch.float64), \
            e.detach().cpu().to(torch.complex128 if e.is_complex() else torch.float64)
        close = torch.isclose(a64, e64, rtol=t_rtol, atol=t_atol, equal_nan=True)
        both_finite = torch.isfinite(a64) & torch.isfinite(e64)
        err = (a64 - e64)[both_finite].abs().max().item() if bool(both_finite.any()) else 0.0
        entry.update(ok=bool(close.all()), dtype=str(e.dtype).replace("torch.", ""), shape=list(e.shape),
                     max_abs_err=err, atol=t_atol, rtol=t_rtol, mismatched=int((~close).sum()))
    else:
        entry.update(ok=bool(torch.equal(a.cpu(), e.cpu())), dtype=str(e.dtype).replace("torch.", ""),
                     shape=list(e.shape))
    return entry


def _same_value(a, e) -> bool:
    if isinstance(e, float) and isinstance(a, float) and math.isnan(e):
        return math.isnan(a)
    return a == e


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


def check_numerics(model, args: tuple, kwargs: dict, *, options=None, atol=None, rtol=None) -> dict:
    """Run ``model`` eagerly and compiled with ``backend="flexattn"``; compare (see ``compare_outputs``)."""
    with torch.no_grad():
        expected = model(*args, **kwargs)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="flexattn", options=options)
        actual = compiled(*args, **kwargs)
    torch._dynamo.reset()
    return compare_outputs(actual, expected, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_inductor",
                                description="attn_inductor: check that a model's attention is rewritten.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="explain + compiled-vs-eager numerics; non-zero exit on a miss",
                       description="Explain every attention site of the model returned by FACTORY, compare "
                                   "the compiled model's outputs with eager, exit non-zero on a miss.")
    c.add_argument("factory", help="package.module:function or path/to/file.py:function returning "
                                   "(model, example_inputs)")
    c.add_argument("--expect", type=int, default=None, metavar="N",
                   help="the number of attention sites there must be")
    c.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    c.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: by dtype)")
    c.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: by dtype)")
    c.add_argument("--options", default=None, metavar="JSON",
                   help='backend options as a JSON object, e.g. \'{"impl": "cpu"}\'')
    c.add_argument("--no-numerics", action="store_true", help="only explain; skip the compiled-vs-eager run")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m attn_inductor`` and the ``attn-inductor`` script; returns the exit status."""
    parser = _parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on errors; keep main() callable from tests
        return int(exc.code or 0)
    try:
        options = json.loads(ns.options) if ns.options else None
        if options is not None and not isinstance(options, dict):
            raise UsageError("--options must be a JSON object")
        factory = load_factory(ns.factory)
        model, args, kwargs = call_factory(factory)
    except UsageError as exc:
        print(f"attn_inductor check: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # noqa: BLE001 - the user's factory failed: say where
        traceback.print_exc()
        print(f"attn_inductor check: error: the factory {ns.factory} raised", file=sys.stderr)
        return EXIT_USAGE
    return run_check(model, args, kwargs, name=ns.factory, expect=ns.expect, json_path=ns.json,
                     atol=ns.atol, rtol=ns.rtol, options=options, numerics=not ns.no_numerics)


def run_check(model, args: tuple, kwargs: dict, *, name: str = "model", expect: int | None = None,
              json_path: str | None = None, atol: float | None = None, rtol: float | None = None,
              options: dict | None = None, numerics: bool = True) -> int:
    from ..explain import explain
    from .asserts import rewrite_problems

    report = explain(model, *args, options=options, **kwargs)
    print(report)
    problems = rewrite_problems(report, expect)

    num = None
    if numerics:
        try:
            num = check_numerics(model, args, kwargs, options=options, atol=atol, rtol=rtol)
        except Exception as exc:  # noqa: BLE001 - a compile failure is a failed check, not a crash
            traceback.print_exc()
            num = {"ok": False, "error": f"compiled run failed: {type(exc).__name__}: {exc}"}
        print(_numerics_lines(num))

    numerics_failed = num is not None and not num["ok"]
    if problems:
        status = EXIT_MISS
    elif numerics_failed:
        status = EXIT_NUMERICS
    else:
        status = EXIT_OK
    if numerics_failed:
        problems.append("outputs differ from eager" + (f": {num['error']}" if "error" in num else ""))
    parts = list(problems) or [f"{len(report.rewritten)}/{len(report.sites)} attention site(s) rewritten"
                               + (f" (expected {expect})" if expect is not None else "")]
    if num is not None and num["ok"]:
        parts.append(f"outputs match eager (max abs err {num['max_abs_err']:.1e})")
    verdict = f"attn_inductor check: {'PASS' if status == EXIT_OK else 'FAIL'} {name}: " + "; ".join(parts)

    if json_path:
        data = report.to_dict()
        data.update(target=name, expected=expect, numerics=num, problems=problems, passed=status == EXIT_OK,
                    exit_status=status, verdict=verdict)
        with open(json_path, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
    print(verdict)
    return status


def _numerics_lines(num: dict) -> str:
    if "outputs" not in num:
        return f"numerics: {num.get('error')}"
    lines = ["numerics (compiled vs eager):"]
    for o in num["outputs"]:
        mark = "ok  " if o["ok"] else "FAIL"
        if "error" in o:
            lines.append(f"  {mark} {o['name']}: {o['error']}")
        elif "max_abs_err" in o:
            lines.append(f"  {mark} {o['name']} {o['dtype']}{o['shape']}: max abs err {o['max_abs_err']:.2e} "
                         f"(atol {o['atol']:.0e}, rtol {o['rtol']:.0e}; {o['mismatched']} element(s) outside)")
        elif "note" in o:
            lines.append(f"  {mark} {o['name']}: {o['kind']} {o['note']}")
        else:
            lines.append(f"  {mark} {o['name']}: {o.get('dtype', o.get('kind'))} compared exactly")
    if "error" in num:
        lines.append(f"  FAIL {num['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
