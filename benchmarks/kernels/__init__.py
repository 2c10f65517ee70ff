"""Kernel benchmark of vold (`python -m benchmarks.kernels`): time and peak memory of one loss, computed
several ways on the same inputs.

The objective is the same in every row: GRPO clipped policy loss (token-level ratio, epsilon_low 0.2,
epsilon_high 0.3, loss_type "dapo" = mean over masked tokens) + 0.1 * reverse KL(student || teacher)
per token. Estimator "full" is the exact full-vocabulary KL (needs the teacher's hidden states and
lm_head); "k2" is the sampled-token estimate (logp - teacher_logp)^2 / 2 from given teacher log-probs.

Implementations (rows):

- naive           plain PyTorch, full [N, V] logits, autograd: the float64 oracle vold.kernels.reference
                  run in the working precision (dtype=None: GEMMs in the input dtype, fp32 softmax)
- vold_torch      vold.kernels.vold_loss(impl="torch")
- vold_compile    vold.kernels.vold_loss(impl="torch_compile") (first call, i.e. compile, reported separately)
- vold_triton     vold.kernels.vold_loss(impl="triton"), CUDA only
- trl             TRL 1.16's chunked kernels as a TRL user assembles them: ChunkedLogProbFunction log-probs ->
                  the same GRPO loss, + 0.1 * ChunkedDivergenceFunction(beta=1) (full) or + 0.1 * k2 (k2)
- liger           LigerFusedLinearGRPOLoss + 0.1 * LigerFusedLinearJSDLoss(beta=1, soft only), eager
- liger_compiled  the same with compiled=True (first call, i.e. compile, reported separately)
- gemm_floor      only the unavoidable GEMMs (teacher logits, student logits, dX, dW; 3 for "k2"),
                  chunked with vold's chunk size: the floor for this loss on this machine
- gemm_unchunked  (opt-in) the same GEMMs on whole [N, V] buffers

Estimators "logp" / "logp_grad" (preset logprobs; opt-in elsewhere) time the log-prob pass alone instead:
vold's fused_linear_logprobs (per vold_* row) vs TRL's ChunkedLogProbFunction, under no_grad (the old-policy /
reference / teacher pass) and forward + backward; the GEMM floor is 1 GEMM (no grad) or 3.

Time: forward + backward, median of --repeats after --warmup calls, all rows of one shape in this
process on the same tensors, timed round-robin (row A, B, C, A, B, C, ...) so that drift hits all rows
alike. On a shared machine every timed call waits until other processes use < --max-foreign-cpu cores
and is re-timed (--retries) if they used more while it ran; that foreign CPU use is reported per row.

On CUDA a call is timed with CUDA events after a synchronisation; a call that runs out of memory is
recorded as "oom" (the sweep goes on).

Peak memory ("peak extra": above the memory held once the inputs exist, including the gradients dX
and dW): CUDA, max_memory_allocated in process; CPU, peak RSS of a fresh child process per (shape,
implementation) (`--child`): VmHWM, reset after a warm-up call, minus the RSS once the inputs exist.

Outputs in --output (default benchmarks/results/): kernels_<tag>.json, kernels_<tag>.md and
kernels_<tag>_V<V>_H<H>_<dtype>.png (time and memory vs N, one line per implementation).

Package layout: config.py (objective constants, rows, shapes, presets, Settings), inputs.py, candidates.py
(one step() per row), timing.py, memory.py (CUDA in process, CPU in a child), sweep.py (one shape),
report.py (markdown, plots), cli.py; the harness shared with benchmarks.step and benchmarks.trainer is
benchmarks/harness.py.

Examples:
  python -m benchmarks.kernels                    # default sweep for this device (CPU: ~30 min timing, + memory)
  python -m benchmarks.kernels --preset quick     # smoke run, < 1 min on CPU
  python -m benchmarks.kernels --preset headline  # (N,H,V) = (4096,1024,32768) and (2048,896,151936), fp32
  python -m benchmarks.kernels --preset headline --dtype bf16  # the same shapes, bf16 inputs (fp32 logits)
  python -m benchmarks.kernels --preset memory    # N=16384, V=32768: peak memory vs one [N, V] fp32 tensor
  python -m benchmarks.kernels --preset logprobs  # the log-prob pass alone: vold vs TRL, no_grad and with grad
  python -m benchmarks.kernels --preset gpu       # CUDA: N=4k/16k/64k, H=2048/3584, V=151936, bf16
  python -m benchmarks.kernels --shapes 4096x1024x32768 --impls vold_torch,gemm_floor --estimators full
"""


from ..harness import REPO_ROOT, machine_info
from .candidates import TRL_VOCAB_CHUNK, Step, build_step, trl_logprobs, trl_loss, vold_chunk_size
from .cli import main, parse_args, settings_and_shapes, write_outputs
from .config import (
                     DEFAULT_ESTIMATORS,
                     DEFAULT_IMPLS,
                     DISTILL_COEF,
                     DTYPES,
                     EPSILON_HIGH,
                     EPSILON_LOW,
                     ESTIMATORS,
                     ESTIMATORS_OF,
                     IMPLS,
                     LOGP_PASSES,
                     LOSS_ESTIMATORS,
                     LOSS_TYPE,
                     PRESETS,
                     VOLD_ENGINE,
                     Settings,
                     Shape,
)
from .inputs import Inputs, active_tokens, layout, make_inputs
from .memory import child_measure, cuda_peak
from .report import markdown, plot
from .sweep import row_keys, run_shape
from .timing import time_rows

__all__ = [
    "DEFAULT_ESTIMATORS", "DEFAULT_IMPLS", "DISTILL_COEF", "DTYPES", "EPSILON_HIGH", "EPSILON_LOW", "ESTIMATORS",
    "ESTIMATORS_OF", "IMPLS", "LOGP_PASSES", "LOSS_ESTIMATORS", "LOSS_TYPE", "PRESETS", "REPO_ROOT", "TRL_VOCAB_CHUNK",
    "VOLD_ENGINE", "Inputs", "Settings", "Shape", "Step", "active_tokens", "build_step", "child_measure", "cuda_peak",
    "layout", "machine_info", "main", "make_inputs", "markdown", "parse_args", "plot", "row_keys", "run_shape",
    "settings_and_shapes", "time_rows", "trl_logprobs", "trl_loss", "vold_chunk_size", "write_outputs",
]
