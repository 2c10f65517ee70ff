"""vold.kernels: fused GRPO + distillation losses that never materialise [N, V] logits.

Public API (see each docstring for the math and shapes):

- :func:`fused_linear_logprobs`  log p(target) (and entropy) of ``hidden @ weight^T``
- :func:`fused_linear_divergence`  exact full-vocabulary reverse KL / forward KL / JSD between two heads
- :func:`vold_loss`  GRPO + ref KL + distillation, student logits computed once per chunk

Engines (``impl=``): ``"torch"`` (chunked PyTorch, any device), ``"torch_compile"``, ``"triton"`` (GPU
kernels; runs on the CPU under ``TRITON_INTERPRET=1``), ``"auto"`` (triton on CUDA, torch elsewhere).
This package imports only torch (triton lazily, when the triton engine is asked for).

Layers, each module importing only those above it: ``common`` (Head, VocabShard, ChunkSpec, chunk sizing,
dtype helpers) -> ``engines`` (the ``Engine`` protocol, ``engines.torch``, ``engines.triton``, chosen by
name) and ``chunked`` (the chunk loop) -> ``logprobs``, ``divergence``, ``vold_loss`` (with ``checks``
and ``policy_loss``). ``vold.kernels.reference`` is the float64 oracle: a full-logits implementation of
every public function, importing only torch.
"""

from .divergence import FusedLinearDivergence, fused_linear_divergence
from .logprobs import FusedLinearLogprobs, fused_linear_logprobs
from .policy_loss import PolicyLossConfig, kl_estimate
from .vold_loss import VoldLoss, vold_loss

__all__ = [
    "FusedLinearDivergence",
    "FusedLinearLogprobs",
    "PolicyLossConfig",
    "VoldLoss",
    "fused_linear_divergence",
    "fused_linear_logprobs",
    "kl_estimate",
    "vold_loss",
]
