"""Every torch / Triton version gate and feature probe lives here, nowhere else.

Supported: torch 2.11 (GPU machines, Python 3.12, Triton 3.6) and torch 2.13
(CPU CI, Python 3.11, Triton 3.9).  Other modules ask this one questions
("is the Triton interpreter on?", "which fake mode does this graph use?")
instead of checking versions themselves.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def env(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)`` for the per-call policy reads of the launch path.

    ``os.environ.get`` encodes the key and goes through the mapping ABC (~1.5 us on a
    fast host, several on a loaded GPU host, a dozen reads per forward+backward);
    on POSIX CPython the environment's backing dict is read directly (same values:
    ``os.environ`` writes through to it), elsewhere the plain call.
    """
    if _ENV_DATA is not None:
        value = _ENV_DATA.get(_env_key(name))
        return default if value is None else value.decode(_ENV_ENCODING, "surrogateescape")
    return os.environ.get(name, default)


_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if _ENV_DATA is not None and not all(isinstance(k, bytes) for k in list(_ENV_DATA)[:1]):
    _ENV_DATA = None  # not the layout this relies on
_ENV_ENCODING = __import__("sys").getfilesystemencoding()


@functools.lru_cache(maxsize=None)
def _env_key(name: str) -> bytes:
    return name.encode(_ENV_ENCODING, "surrogateescape")


def env_reader(*names: str):
    """A function returning the raw values of ``names`` (None where unset), for per-call cache keys:
    equal tuples mean equal values of every ``env(name)``, without decoding anything."""
    if _ENV_DATA is not None:
        keys, get = tuple(_env_key(n) for n in names), _ENV_DATA.get
        return lambda: tuple(map(get, keys))
    return lambda: tuple(map(os.environ.get, names))


# every environment variable a launch plan (or a call site, ops.py) depends on: one reader for both
POLICY_ENV = ("ATTN_INDUCTOR_FWD_CONFIG", "ATTN_INDUCTOR_BWD_CONFIG", "ATTN_INDUCTOR_SPARSITY",
              "ATTN_INDUCTOR_STATIC_LAUNCH", "TRITON_INTERPRET")
policy_env = env_reader(*POLICY_ENV)


def cuda_graph_pool_active(device) -> bool:
    """Allocations on this thread may land in a CUDA graph's private memory pool: a stream capture, or
    the warm-up and recording runs of Inductor's CUDA graph trees (``mode="reduce-overhead"``).

    Device tensors made then must not be kept in our caches, and cached tensors must not be read into a
    capture (Note [CUDA graphs] in masks/block_sparsity.py).  Reads the trees' manager (private API)
    only when Inductor's CUDA graph module is loaded; any surprise there answers True (caching off is
    only slower)."""
    if getattr(device, "type", device) != "cuda":
        return False
    if torch.cuda.is_current_stream_capturing():
        return True
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None:
        return False
    try:  # the per-device containers (shared with autograd's threads); reading them creates nothing
        containers = trees.get_obj(trees.local, "tree_manager_containers")
        if not containers:
            return False
        index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
        container = containers.get(index)
        manager = None if container is None else container.tree_manager
        return manager is not None and bool(manager.in_warmup or manager.in_recording)
    except Exception:  # noqa: BLE001
        return True


def triton_interpret_enabled() -> bool:
    """``TRITON_INTERPRET=1``: the Triton kernels run on CPU tensors (how CI tests them)."""
    return env("TRITON_INTERPRET", "0") not in ("", "0")


def fake_mode_of_graph(gm: torch.fx.GraphModule):
    """Dynamo's fake mode for a graph handed to a backend (None if it has none)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("example_value", node.meta.get("val"))
            mode = getattr(val, "fake_mode", None)
            if mode is not None:
                return mode
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    return ctx.fake_mode if ctx is not None else None


def symbolic_shape_env(gm: torch.fx.GraphModule):
    """The ShapeEnv of a graph Dynamo traced with dynamic sizes (None when every input is static)."""
    symbolic = False
    for val in placeholder_fakes(gm):
        if isinstance(val, torch.SymInt) or (isinstance(val, torch.Tensor) and any(
                isinstance(x, torch.SymInt) for x in (*val.shape, *val.stride()))):
            symbolic = True
            break
    if not symbolic:
        return None
    mode = fake_mode_of_graph(gm)
    return getattr(mode, "shape_env", None)


def symbol_hint(x: torch.SymInt, sym) -> int | None:
    """The value Dynamo recorded for size symbol ``sym`` of ``x`` (its hint), read without a guard; None
    for a symbol with none (an unbacked, data-dependent size)."""
    shape_env = vars(x.node.shape_env)
    # torch 2.13 keeps the hints in ``backed_var_to_val`` (``var_to_val`` is a warning property there);
    # torch 2.11 has only ``var_to_val``
    values = shape_env.get("backed_var_to_val", shape_env.get("var_to_val")) or {}
    return int(values[sym]) if sym in values else None


def concrete_size(x, values: dict) -> int:
    """``x`` (an int or a SymInt) with its free symbols replaced by ``values`` (sympy symbol -> int)."""
    if not isinstance(x, torch.SymInt):
        return int(x)
    return int(x.node.expr.xreplace(values))


def placeholder_fakes(gm: torch.fx.GraphModule) -> list:
    """The fake tensors (or SymInts / constants) Dynamo recorded for each placeholder."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            out.append(node.meta.get("example_value", node.meta.get("val")))
    return out


def placeholder_source_names(gm: torch.fx.GraphModule) -> list[str | None]:
    """Readable names (``self.attn.bias``, ``attention_mask``) of Dynamo's graph inputs."""
    import re

    names: list[str | None] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        source = getattr(node.meta.get("grapharg"), "source", None)
        raw = getattr(source, "name", None)
        if callable(raw):  # a method in older torch, a property in newer
            raw = raw()
        if not isinstance(raw, str):
            names.append(None)
            continue
        s = re.sub(r"^[LG]\['([^']+)'\]", r"\1", raw)
        s = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", s)
        s = re.sub(r"\['([^']+)'\]", r".\1", s)
        # a keyword argument that reached ``forward(**kwargs)`` is named as the caller wrote it
        s = re.sub(r"^kwargs\.", "", s)
        names.append(s)
    return names


# ----------------------------------------------------------------------------- Triton kernels


def triton_libdevice():
    """The libdevice module for compiled kernels, or ``None`` under the interpreter.

    Triton >= 3.0 exposes a backend-dispatching ``triton.language.extra.libdevice``
    (2.x had ``triton.language.extra.cuda.libdevice``).  The interpreter (checked on
    Triton 3.9) raises on ``extern_elementwise``, so ``templates/hook_lib.py`` uses
    portable ``tl`` formulas for ``tanh``/``log1p``/... when this returns ``None``.
    """
    if triton_interpret_enabled():
        return None
    try:
        from triton.language.extra import libdevice  # Triton >= 3.0
    except ImportError:  # pragma: no cover - Triton 2.x
        from triton.language.extra.cuda import libdevice
    return libdevice


def triton_dot_needs_fp32_operands() -> bool:
    """Whether low-precision ``tl.dot`` operands must be widened to fp32 first.

    Triton 3.9's interpreter stores bf16 as raw uint16 and multiplies the bit
    patterns in ``tl.dot``, and rounds fp32 -> bf16 by truncation; the kernels then
    round to the input dtype by hand and multiply exact values in fp32.  Compiled
    kernels use native bf16/fp16 MMA.
    """
    return triton_interpret_enabled()


def fp32_matmul_allows_tf32() -> bool:
    """torch's fp32 matmul policy (``allow_tf32`` / ``set_float32_matmul_precision``),
    which the Triton kernels honour through ``tl.dot(input_precision=...)``."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() in ("high", "medium")
