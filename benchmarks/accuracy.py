"""Accuracy report: every vold.kernels mode against the float64 reference (vold.kernels.reference).

    python -m benchmarks.accuracy [--output benchmarks/results] [--engines torch triton]

For each function / mode / engine / dtype, the error is ``max|a - b| / max(1, max|b|)`` for values and
``max|a - b| / max|b|`` for gradients (the tests' ``assert_rel`` norms), ``b`` being the float64
reference evaluated on the same (dtype-rounded) inputs. bf16/fp16 gradients are returned in that dtype,
so for them the error is counted beyond half an ulp of each element (the rounding of the result itself,
which no computation avoids; ``assert_rel(..., rounding=dtype)``): logits are accumulated and kept in fp32,
so what is left is fp32 arithmetic. fp64 inputs compute in fp64 (torch engine; the Triton kernels are
fp32). The "near convergence" rows are issue 11's kind: teacher hidden states = student's + 0.02 noise,
the same head. The triton engine runs under the interpreter on the CPU (set automatically when no GPU is
present), so its shapes stay small.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

if not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "0" if os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1") else "1"

import torch

from vold.kernels import fused_linear_divergence, fused_linear_logprobs, vold_loss  # noqa: E402
from vold.kernels.reference import half_ulp, leaf64, ref_divergence, ref_logprobs, ref_vold_loss  # noqa: E402

VOLD_MODES: dict[str, dict] = {
    "grpo+full reverse KL": dict(loss_type="grpo", distill_coef=0.1),
    "dapo+full reverse KL+entropy+T0.7": dict(loss_type="dapo", distill_coef=0.1, entropy_coef=0.01, temperature=0.7),
    "bnpo+forward KL": dict(loss_type="bnpo", distill_coef=0.1, divergence="forward_kl"),
    "dr_grpo+JSD(0.3)": dict(loss_type="dr_grpo", distill_coef=0.1, divergence="jsd", jsd_beta=0.3),
    "dapo+k2 (teacher logprobs)": dict(distill_coef=0.1, distill_estimator="k2"),
    "dapo+k3 ref KL+dual clip": dict(distill_coef=0.0, ref_kl_coef=0.05, clip_ratio_c=3.0),
    "GSPO (sequence IS)+full": dict(importance_sampling_level="sequence", distill_coef=0.1),
}


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    """The tests' norm; a bf16/fp16 ``a`` (a returned gradient) is judged beyond its own rounding."""
    low = a.dtype in (torch.bfloat16, torch.float16)
    diff = (a.detach().double() - b.detach().double()).abs()
    if low:
        diff = (diff - half_ulp(b, a.dtype)).clamp(min=0.0)
    scale = max(floor, float(b.detach().double().abs().max()))
    return float(diff.max()) / scale if scale else 0.0


def _inputs(n_seq: int, seq_len: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(dtype)  # noqa: E731
    targets = torch.randint(0, vocab, (n_seq, seq_len), generator=g)
    mask = (torch.rand(n_seq, seq_len, generator=g) > 0.2).float()
    return dict(
        student_hidden=r(n_seq, seq_len, hidden), student_weight=r(vocab, hidden), student_bias=r(vocab),
        teacher_hidden=r(n_seq, seq_len, hidden + 4), teacher_weight=r(vocab, hidden + 4), targets=targets,
        advantages=torch.randn(n_seq, generator=g), mask=mask,
        old_logprobs=-torch.rand(n_seq, seq_len, generator=g) * 6,
        ref_logprobs=-torch.rand(n_seq, seq_len, generator=g) * 6,
        teacher_logprobs=-torch.rand(n_seq, seq_len, generator=g) * 6,
        distill_mask=torch.rand(n_seq, generator=g),
    )


def _run(fn, tensors: dict, options: dict, cast) -> tuple[torch.Tensor, dict, dict]:
    args, leaves = {}, {}
    for key, value in tensors.items():
        value = cast(value) if value.is_floating_point() else value
        if key in ("student_hidden", "student_weight", "student_bias"):
            value = value.detach().clone().requires_grad_(True)
            leaves[key] = value
        args[key] = value
    loss, metrics = fn(**args, **options)
    loss.backward()
    return loss.detach(), metrics, {k: v.grad for k, v in leaves.items()}


def measure(engines: list[str], dtypes: list[torch.dtype], shape: tuple[int, int, int, int]) -> list[dict]:
    n_seq, seq_len, hidden, vocab = shape
    rows = []
    for dtype in dtypes:
        base = _inputs(n_seq, seq_len, hidden, vocab, dtype)
        to64 = lambda t: leaf64(t.detach(), requires_grad=False)  # noqa: E731
        for engine in engines:
            if engine == "triton" and dtype == torch.float64:
                continue  # the Triton kernels compute in fp32 (ValueError)
            for mode, options in VOLD_MODES.items():
                tensors = dict(base)
                if options.get("distill_estimator", "full") != "full":
                    tensors.pop("teacher_hidden"), tensors.pop("teacher_weight")
                else:
                    tensors.pop("teacher_logprobs")
                if not options.get("ref_kl_coef"):
                    tensors.pop("ref_logprobs")
                got = _run(vold_loss, tensors, dict(options, impl=engine, chunk_size=16), lambda t: t)
                want = _run(ref_vold_loss, tensors, options, to64)
                errors = {"loss": _rel(got[0], want[0], 1.0)}
                errors.update({f"grad {k.split('_', 1)[1]}": _rel(got[2][k], want[2][k], 0.0) for k in got[2]})
                rows.append(dict(function="vold_loss", mode=mode, engine=engine, dtype=str(dtype).split(".")[-1],
                                 **{k: v for k, v in errors.items()}))
            h = base["student_hidden"].detach().clone().requires_grad_(True)
            w = base["student_weight"].detach().clone().requires_grad_(True)
            logp, ent = fused_linear_logprobs(h, w, base["targets"], return_entropy=True, impl=engine, chunk_size=16)
            (logp.sum() + ent.sum()).backward()
            h64, w64 = leaf64(h.detach()), leaf64(w.detach())
            rlogp, rent = ref_logprobs(h64, w64, base["targets"])
            (rlogp.sum() + rent.sum()).backward()
            rows.append(dict(function="fused_linear_logprobs", mode="logp+entropy", engine=engine,
                             dtype=str(dtype).split(".")[-1], loss=max(_rel(logp, rlogp, 1.0), _rel(ent, rent, 1.0)),
                             **{"grad hidden": _rel(h.grad, h64.grad, 0.0),
                                "grad weight": _rel(w.grad, w64.grad, 0.0)}))
            g = torch.Generator().manual_seed(1)
            near = (base["student_hidden"].double() + 0.02 * torch.randn(base["student_hidden"].shape, generator=g,
                                                                         dtype=torch.float64)).to(dtype)
            for divergence, beta, near_convergence in (("reverse_kl", 0.5, False), ("forward_kl", 0.5, False),
                                                       ("jsd", 0.3, False), ("reverse_kl", 0.5, True)):
                t_hidden = near if near_convergence else base["teacher_hidden"]
                t_weight = base["student_weight"] if near_convergence else base["teacher_weight"]
                h = base["student_hidden"].detach().clone().requires_grad_(True)
                w = base["student_weight"].detach().clone().requires_grad_(True)
                d = fused_linear_divergence(h, w, t_hidden, t_weight, divergence=divergence,
                                            beta=beta, impl=engine, chunk_size=16)
                d.sum().backward()
                h64, w64 = leaf64(h.detach()), leaf64(w.detach())
                rd = ref_divergence(h64, w64, to64(t_hidden), to64(t_weight), divergence, beta)
                rd.sum().backward()
                mode = divergence + (" near convergence" if near_convergence else "")
                rows.append(dict(function="fused_linear_divergence", mode=mode, engine=engine,
                                 dtype=str(dtype).split(".")[-1], loss=_rel(d, rd, 1.0),
                                 **{"grad hidden": _rel(h.grad, h64.grad, 0.0),
                                    "grad weight": _rel(w.grad, w64.grad, 0.0)}))
    return rows


def to_markdown(rows: list[dict]) -> str:
    cols = ["function", "mode", "engine", "dtype", "loss", "grad hidden", "grad weight", "grad bias"]
    lines = ["| " + " | ".join(c if c != "loss" else "value" for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [row.get(c, "") for c in cols]
        lines.append("| " + " | ".join(f"{c:.1e}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--engines", nargs="+", default=["torch", "triton"])
    parser.add_argument("--shape", nargs=4, type=int, default=[4, 24, 32, 1000], metavar=("B", "T", "H", "V"))
    args = parser.parse_args(argv)
    rows = measure(args.engines, [torch.float32, torch.bfloat16, torch.float16, torch.float64], tuple(args.shape))
    table = to_markdown(rows)
    print(table)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(dict(shape=args.shape, rows=rows), indent=1))
    note = ("bf16/fp16 gradients: error beyond half an ulp of each returned element (see benchmarks/accuracy.py)")
    (out / "accuracy.md").write_text(f"Errors vs the float64 reference, B,T,H,V = {args.shape}; {note}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
