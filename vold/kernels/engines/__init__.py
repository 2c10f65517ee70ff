"""The engines of the chunk loop, behind one small protocol (``Engine``), selected by name (``get_engine``).

An engine turns one chunk of ``[chunk, V]`` logits into per-row statistics (``forward``) and, from the
row coefficients of the objective, into the logit gradient ``dL/dz`` (``backward``). The GEMMs, the
buffers and the accumulation across chunks are the chunk loop's (``vold.kernels.chunked.run_chunks``).

- ``impl="torch"``: ``engines/torch.py``, eager PyTorch on any device (the only one for a vocab shard);
- ``impl="torch_compile"``: the same per-chunk functions through torch.compile (one compiled chunk shape);
- ``impl="triton"``: ``engines/triton.py``, two fused kernels per chunk (GPU; the CPU under
  ``TRITON_INTERPRET=1``), fp32 arithmetic (no fp64 inputs), imported on first use;
- ``impl="auto"``: triton on CUDA when it is installed and the inputs are not fp64, else torch.

The protocol and the registry live in ``registry.py``: a module of this package named ``torch`` would
shadow the torch package in this file's namespace once imported (a submodule becomes an attribute of
its package).
"""

from .registry import ENGINES, Engine, get_engine

__all__ = ["ENGINES", "Engine", "get_engine"]
