"""``Engine`` (the protocol both engines implement) and ``get_engine`` (the registry by ``impl=`` name)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from ..common import ChunkSpec, Workspace
from .torch import TorchEngine


@runtime_checkable
class Engine(Protocol):
    """What ``run_chunks`` asks of an engine (both engines implement exactly this)."""

    name: str

    def forward(
        self, z: torch.Tensor, u: torch.Tensor | None, targets: torch.Tensor, spec: ChunkSpec,
        workspace: Workspace | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """``(stats, cache)`` of one chunk: ``stats`` holds ``[chunk]`` ``logp`` and, as ``spec`` asks,
        ``entropy``, ``teacher_logp``, ``divergence`` (compute dtype); ``cache`` is what ``backward`` needs."""
        ...

    def backward(
        self, cache: dict, g_logp: torch.Tensor, g_ent: torch.Tensor | None, g_div: torch.Tensor | None,
        spec: ChunkSpec,
    ) -> torch.Tensor:
        """``dL/dz`` ``[chunk, V]`` from the row coefficients dL/dlogp, dL/dH, dL/dD (the logits' buffer may
        be consumed)."""
        ...


def _triton_engine(chunk_rows: int | None) -> Engine:
    from .triton import TritonEngine  # optional dependency: triton is imported only when asked for

    return TritonEngine()


# name -> factory(chunk rows torch_compile compiles for) -> Engine
ENGINES: dict[str, Callable[[int | None], Engine]] = {
    "torch": lambda chunk_rows: TorchEngine(),
    "torch_compile": lambda chunk_rows: TorchEngine(compiled=True, chunk_rows=chunk_rows),
    "triton": _triton_engine,
}


def get_engine(
    impl: str, device: torch.device, chunk_size: int | None = None, dtype: torch.dtype = torch.float32
) -> Engine:
    """The engine for ``impl``: "torch", "torch_compile", "triton" or "auto" (triton on CUDA when
    installed and the inputs are not fp64, else torch). ``chunk_size``: the row count torch_compile
    compiles for. ``dtype``: the inputs' dtype; the Triton kernels compute in fp32, so fp64 inputs with
    ``impl="triton"`` raise ``ValueError``, as does an unknown ``impl``."""
    if impl == "auto":
        use_triton = device.type == "cuda" and dtype != torch.float64 and _triton_available()
        impl = "triton" if use_triton else "torch"
    if impl == "triton" and dtype == torch.float64:
        raise ValueError("impl='triton' computes in fp32 and does not take float64 inputs; use impl='torch' "
                         "(or 'torch_compile', or 'auto') for float64 math end to end")
    if impl not in ENGINES:
        raise ValueError(f"impl={impl!r} is not one of ('auto', 'torch', 'torch_compile', 'triton')")
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        # without this, Triton fails deep in its launcher with "0 active drivers ([])"
        raise ValueError(f"impl='triton' needs CUDA tensors, got {device.type} ones; use impl='auto' or 'torch' "
                         "(or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")
    return ENGINES[impl](chunk_size)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
