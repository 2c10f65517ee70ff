"""The kernels' shared vocabulary: what the chunk loop, the engines and the public functions all speak.

- ``Head``: one model's hidden states and lm_head (with its ``LogitTransform``: logit_scale / softcap),
  whose logits a chunk computes in ``compute_dtype`` (fp32 from bf16/fp16/fp32 inputs, fp64 from fp64);
- ``VocabShard``: this rank's slice of a vocab-parallel lm_head (``resolve_shard`` / ``vocab_shard``);
- ``ChunkSpec``: which per-row statistics a call needs, and ``DIVERGENCE_CODE`` (the engines' integer
  code of each divergence);
- chunk sizing (``default_chunk_size``), the low-precision GEMM helpers (``mm_has_out_dtype``,
  ``mm_out_fp32``), the eager engine's scratch buffers (``Workspace``) and the gradient cast back to an
  input's dtype (``cast_grad``, which refuses a float16 overflow).

This module imports only torch and nothing else from ``vold.kernels``: every other kernel module sits on it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

# Elements of one [chunk, V] buffer the default chunk size aims at (per device type).
_CHUNK_BUDGET = {"cpu": 1 << 23, "cuda": 1 << 27}
_MIN_CHUNK, _MAX_CHUNK = 256, 16384


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of every logit, statistic and accumulation for inputs of ``dtype``: promote(fp32, dtype),
    i.e. fp32 for bf16 / fp16 / fp32 inputs and fp64 for fp64 inputs."""
    return torch.promote_types(torch.float32, dtype)


_MM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def mm_out_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` of two bf16/fp16 matrices with an fp32 accumulation and an fp32 output (cuBLAS)."""
    if out is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def mm_has_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` inputs on this device type
    (a low-precision GEMM with fp32 accumulation and an fp32 output: cuBLAS in torch >= 2.8; not on the
    CPU in torch 2.13). Probed once per (device type, dtype) with a 2x2 product."""
    key = (device.type, dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.zeros(2, 2, dtype=dtype, device=device)
            _MM_OUT_DTYPE[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, NotImplementedError, TypeError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


@dataclass(frozen=True)
class LogitTransform:
    """``z -> c tanh(z s / c)`` (``softcap`` c, Gemma-2's final_logit_softcapping) or ``z -> z s`` (no cap),
    with ``s = logit_scale`` (Cohere's), applied to a head's logits ``h W^T + b`` before the temperature,
    as TRL's chunked kernels order them. Its derivative is ``s (1 - (z'/c)^2)`` at the capped ``z'``."""

    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        if self.softcap is not None:
            return z.mul_(self.logit_scale / self.softcap).tanh_().mul_(self.softcap)
        return z.mul_(self.logit_scale) if self.logit_scale != 1.0 else z

    def backward_(self, dz: torch.Tensor, capped: torch.Tensor | None) -> torch.Tensor:
        """dL/dz from dL/dz' (in place); ``capped``: z' of the chunk (consumed), needed with a soft cap."""
        if self.softcap is not None:
            dz.mul_(capped.div_(self.softcap).square_().neg_().add_(1.0))
        return dz.mul_(self.logit_scale) if self.logit_scale != 1.0 else dz


@dataclass
class Head:
    """One model's last hidden states ``[N, H]`` and lm_head ``weight [V, H]``, ``bias [V]``.

    Its logits are computed in ``compute_dtype(weight.dtype)`` with an accumulation of that precision
    whatever the input dtype, and never rounded to the input dtype: bf16/fp16 inputs on CUDA use a
    low-precision GEMM with an fp32 output (``torch.mm(out_dtype=torch.float32)``); elsewhere (the CPU:
    torch 2.13 has no such GEMM there) the weight is upcast once per call (V x H x 4 bytes, kept while
    the call runs) and each chunk's hidden rows when they are used. ``dtype`` may be raised by
    ``run_chunks`` to the other head's compute dtype.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: LogitTransform = LogitTransform()

    def __post_init__(self) -> None:
        self.dtype = compute_dtype(self.weight.dtype)
        self._upcast: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def upcast(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` in ``self.dtype`` (made once, on first use)."""
        if self._upcast is None or self._upcast[0].dtype != self.dtype:
            bias = None if self.bias is None else self.bias.to(self.dtype)
            self._upcast = (self.weight.to(self.dtype), bias)
        return self._upcast

    def logits(self, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``transform(hidden[start:end] @ weight^T (+ bias))`` in ``self.dtype``, into ``out`` when given."""
        return self.transform.apply_(self._linear(start, end, out))

    def _linear(self, start: int, end: int, out: torch.Tensor | None) -> torch.Tensor:
        h = self.hidden[start:end]
        if h.dtype == self.dtype:
            weight, bias = self.weight, self.bias
        elif self.dtype == torch.float32 and mm_has_out_dtype(h.device, h.dtype):
            z = mm_out_fp32(h, self.weight.t(), out=out)
            return z if self.bias is None else z.add_(self.bias)
        else:
            h = h.to(self.dtype)
            weight, bias = self.upcast()
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias, h, weight.t(), out=out)


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[start, start + size)`` of a vocabulary sharded over ``group`` (tensor-parallel
    lm_head, as Megatron's vocab-parallel cross-entropy). Row statistics are all-reduced: the max and
    sum-exp for each log-normaliser, then every vocabulary sum; the target's logit lives on one rank."""

    group: object  # torch.distributed.ProcessGroup
    start: int
    size: int

    def max(self, x: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return x

    def local_targets(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index into this shard, clamped; 1.0 where the target is on this rank else 0.0)."""
        local = targets - self.start
        inside = (local >= 0) & (local < self.size)
        return local.clamp(0, self.size - 1), inside.float()


def resolve_shard(
    process_group, local_rows: int, device: torch.device, impl: str, vocab_size: int | None
) -> tuple[str, VocabShard | None, int]:
    """``(impl, shard, global vocabulary size)`` for an optional ``process_group`` (vocab-parallel)."""
    if process_group is None:
        return impl, None, local_rows
    if vocab_size is not None:
        raise ValueError("vocab_size= cannot be combined with process_group= (shard the common rows instead)")
    shard = vocab_shard(process_group, local_rows, device, impl)
    return "torch", shard, local_rows * torch.distributed.get_world_size(process_group)


def vocab_shard(process_group, local_rows: int, device: torch.device, impl: str) -> VocabShard:
    """The ``VocabShard`` of this rank: equal contiguous shards, rank r holding rows
    ``[r * local_rows, (r + 1) * local_rows)`` of the global vocabulary (Megatron's layout)."""
    if impl not in ("auto", "torch"):
        raise ValueError(f"process_group= (vocab-parallel lm_head) runs on impl='torch', got impl={impl!r}")
    import torch.distributed as dist

    sizes = torch.tensor([local_rows, -local_rows], dtype=torch.float64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=process_group)
    if int(sizes[0]) != local_rows or int(-sizes[1]) != local_rows:
        raise ValueError(
            f"process_group: every rank must hold the same number of vocabulary rows (weight shards of "
            f"{int(-sizes[1])}..{int(sizes[0])} rows); pad the vocabulary to a multiple of the world size"
        )
    return VocabShard(process_group, dist.get_rank(process_group) * local_rows, local_rows)



@dataclass(frozen=True)
class ChunkSpec:
    """Which per-row statistics a call needs. ``inv_temperature`` and ``beta`` are kept as Python floats (an
    option given as a NumPy number or a one-element tensor is read once here): the Triton kernels take them as
    scalar arguments, where a tensor is a pointer and a NumPy float32 is refused."""

    inv_temperature: float = 1.0
    need_entropy: bool = False
    divergence: str | None = None  # None | "reverse_kl" | "forward_kl" | "jsd"
    beta: float = 0.5  # JSD mixing weight (Liger's convention: 0 = forward KL, 1 = reverse KL)
    need_teacher_logp: bool = False
    shard: VocabShard | None = None  # vocab-parallel lm_head (torch engine)

    def __post_init__(self) -> None:
        if not torch.compiler.is_compiling():
            object.__setattr__(self, "inv_temperature", float(self.inv_temperature))
            object.__setattr__(self, "beta", float(self.beta))

    @property
    def needs_teacher(self) -> bool:
        return self.divergence is not None or self.need_teacher_logp


def default_chunk_size(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk: a power of two near ``budget / V``, clamped to [256, 16384] (independent of N,
    so torch_compile sees one chunk shape)."""
    budget = _CHUNK_BUDGET.get(device.type, _CHUNK_BUDGET["cuda"])
    rows = 1 << max(0, int(math.log2(max(1, budget // vocab_size))))
    return max(_MIN_CHUNK, min(_MAX_CHUNK, rows))


# Elements of one row block of the CPU torch engines' elementwise passes (see ``block_rows``), measured on the
# 2-core EPYC at V = 32768 / 151936: eager 18.5 / 77 ms per 256-row chunk (fwd + bwd, reverse KL) against
# 50 / 221 ms over the whole chunk; torch_compile 8 / 34 ms against 18 / 76 ms.
_BLOCK_ELEMENTS = {False: 1 << 19, True: 1 << 22}


def block_rows(vocab_size: int, device: torch.device, compiled: bool, chunk_rows: int | None) -> int | None:
    """Rows per block of the torch engines' elementwise passes over a ``[chunk, V]`` chunk, or None (the
    whole chunk). On the CPU the GEMMs want a chunk of hundreds of rows, but each of the ~20 passes of the
    row statistics and dL/dz over a 32-155 MiB chunk streams it from DRAM: blocks that stay in the cache
    (about 2 MiB eager, 16 MiB compiled; the power of two nearest ``elements / V`` rows, at most the chunk)
    make those passes 2.2-2.9x faster. On CUDA the chunk is one block (one kernel launch per pass)."""
    if device.type != "cpu":
        return None
    rows = 1 << max(0, round(math.log2(max(1.0, _BLOCK_ELEMENTS[compiled] / vocab_size))))
    return rows if chunk_rows is None else max(1, min(rows, chunk_rows))


# The engines' integer code of each divergence (None: no teacher term).
DIVERGENCE_CODE = {None: 0, "reverse_kl": 1, "forward_kl": 2, "jsd": 3}


class Workspace:
    """Reusable ``[rows, V]`` scratch buffers (of the logits' dtype) for the eager engine, owned by one
    ``run_chunks`` call: buffer ``i`` is allocated once and lent block after block, chunk after chunk (``[block,
    V]`` on the CPU, see ``block_rows``; ``[chunk, V]`` on CUDA); a ragged block gets a row slice."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def get(self, index: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(index)
        rows, cols = like.shape
        if (buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.device != like.device
                or buf.dtype != like.dtype):
            buf = self._buffers[index] = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
        return buf[:rows]



def vocab_rows(t: torch.Tensor | None, vocab: int) -> torch.Tensor | None:
    """The first ``vocab`` rows of an lm_head weight or bias (a head padded past the tokenizer), or ``t`` itself
    when it has no more: a ``[:V]`` slice still costs its backward (SliceBackward0) a fresh ``[V, H]`` gradient
    and a copy of dW, 0.4 s at V = 151936, H = 896 on the 2-core CPU."""
    return t if t is None or t.shape[0] == vocab else t[:vocab]


def cast_grad(name: str, grad: torch.Tensor | None, dtype: torch.dtype,
              upstream: tuple[torch.Tensor | None, ...] = ()) -> torch.Tensor | None:
    """``grad`` in ``dtype`` (the input's). A finite gradient that does not fit float16's range (|g| > 65504)
    raises ``ValueError`` naming the input instead of coming back as inf, unless the backward was scaled up: an
    upstream gradient (``upstream``: the backward's ``grad_output`` tensors) with a magnitude > 1 is taken as a loss
    scaler's multiplier (``torch.amp.GradScaler``, DeepSpeed's and apex's fp16 dynamic loss scaling, which start at
    2^16), and their protocol is torch's own: the overflow comes back as inf, the scaler skips the step and lowers
    its scale. That inf comes with a ``RuntimeWarning`` naming the input (shown once per input by Python's default
    filter), so a loss multiplied up without a scaler does not get an inf gradient unseen. The rule reads only the
    upstream gradient's size: a per-token upstream gradient of a scaled mean can stay below 1 (scale 512 over 1024
    tokens), and then the overflow raises. The check, one host sync, runs for fp16 outputs only."""
    if grad is None or grad.dtype == dtype:
        return grad
    out = grad.to(dtype)
    if dtype == torch.float16 and not torch.compiler.is_compiling() and not bool(torch.isfinite(out).all()):
        if any(u is not None and u.numel() and float(u.detach().abs().max()) > 1.0 for u in upstream):
            warnings.warn(  # a scaled backward: inf is the loss scaler's overflow signal
                f"the gradient w.r.t. {name} overflows float16 and is returned as inf: the backward was scaled up "
                "(an upstream gradient > 1), taken as a loss scaler's, which skips this step and lowers its scale; "
                "without a loss scaler, use bf16 or fp32 inputs or scale the loss down", RuntimeWarning, stacklevel=3)
            return out
        raise ValueError(
            f"the gradient w.r.t. {name} overflows float16 (max |g| = {float(grad.abs().max()):.3g} > 65504): "
            "use bf16 or fp32 inputs, or scale the loss down"
        )
    return out
