"""The report of a kernel benchmark run: the markdown table, the summary against the targets, the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..harness import MIB, fmt, mib, pyplot
from .config import IMPLS, LOSS_ESTIMATORS, VOLD_ENGINE

LINE_STYLE = {"full": "-", "k2": "--", "logp": ":", "logp_grad": "-."}
MARKER = {"full": "o", "k2": "s", "logp": "^", "logp_grad": "v"}


def markdown(result: dict[str, Any]) -> str:
    """The results table and a summary against the engine's targets."""
    m, rows = result["machine"], result["rows"]
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    out = [
        f"# vold kernel benchmark: {result['tag']}",
        "",
        f"{m['date']} | CPU {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads){gpu} | "
        f"torch {m['torch']}, triton {m['triton']}, liger-kernel {m['liger_kernel']} | vold {m['git_commit']} "
        f"(vold/kernels/ sha256 {m['kernels_sha256']}) | {result['elapsed_s']:.0f} s",
        "",
        *([] if result.get("complete", True) else ["**Partial: the sweep is still running or was stopped.**", ""]),
        "Objective: GRPO clipped loss (token ratio, eps 0.2/0.3, dapo) + 0.1 x reverse KL(student||teacher); "
        "forward + backward (est full / k2); est logp / logp_grad: the log-prob pass alone (no_grad / forward + "
        "backward of the masked mean; vold fused_linear_logprobs vs TRL ChunkedLogProbFunction), median of "
        f"{result['settings']['repeats']} after {result['settings']['warmup']} warm-up. "
        "Peak extra = peak memory above the inputs, including the gradients dX, dW. "
        "Foreign CPU = most cores other processes used during a kept timed call (> 0.3: disturbed). "
        "Compile = first call - median, compiled rows only.",
        "",
        "| impl | est | N | H | V | dtype | time (s) | min (s) | x floor | x naive | first call (s) | compile (s) "
        "| peak extra (MiB) | / [N,V] fp32 | loss | foreign CPU | status |",
        "|---|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        status = r["status"] if r.get("mem_status") in ("ok", "off") else f"{r['status']}; memory {r['mem_status']}"
        out.append(
            f"| {r['impl']} | {r['estimator']} | {r['n']} | {r['h']} | {r['v']} | {r['dtype']} "
            f"| {fmt(r.get('time_s'), '.3f')} | {fmt(r.get('time_min_s'), '.3f')} | {fmt(r.get('ratio_floor'))} "
            f"| {fmt(r.get('ratio_naive'))} | {fmt(r.get('first_call_s'))} | {fmt(r.get('compile_s'), '.1f')} "
            f"| {mib(r.get('peak_extra_bytes'))} "
            f"| {fmt(r.get('peak_extra_over_nv'), '.3f')} | {fmt(r.get('loss'), '.6g')} "
            f"| {fmt(r.get('foreign_cpu_max'))} | {status} |"
        )
    out += ["", "## Summary against the targets", "",
            "Targets: engine <= 1.05 x gemm_floor; >= 2x faster than Liger (best of eager and compiled); "
            ">= 2.5x faster than TRL's chunked kernels (trl: ChunkedLogProbFunction + ChunkedDivergenceFunction); "
            "peak extra <= 1/8 of one [N, V] fp32 tensor (target set at N=16384, V=32768: marked there only). "
            "'liger best / floor' bounds the speed-up over Liger of any implementation that runs at the floor: "
            "Liger's GRPO and JSD losses compute the student logits and their gradients twice (7 GEMMs vs 4).", "",
            "| engine | est | N | H | V | engine / floor | trl / engine | trl / floor | liger best / engine "
            "| liger best / floor | naive / floor | peak extra MiB: engine / trl / liger / liger_c / naive / floor "
            "| engine extra / [N,V] fp32 |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["estimator"], r["n"], r["h"], r["v"], r["dtype"]), {})[r["impl"]] = r
    for (est, n, h, v, _), by in groups.items():
        def t(name: str, by: dict[str, dict] = by) -> float | None:
            r = by.get(name)
            return r.get("time_s") if r and r["status"] == "ok" else None

        liger_times = [x for x in (t("liger"), t("liger_compiled")) if x]
        naive_floor = t("naive") / t("gemm_floor") if t("naive") and t("gemm_floor") else None
        trl_floor = t("trl") / t("gemm_floor") if t("trl") and t("gemm_floor") else None
        liger_floor = min(liger_times) / t("gemm_floor") if liger_times and t("gemm_floor") else None
        for engine in VOLD_ENGINE:
            if engine not in by or by[engine]["status"] != "ok":
                continue
            e = by[engine]
            speedup = min(liger_times) / t(engine) if liger_times else None
            over_trl = t("trl") / t(engine) if t("trl") else None
            mems = " / ".join(mib(by[k].get("peak_extra_bytes")) if k in by else "-"
                              for k in (engine, "trl", "liger", "liger_compiled", "naive", "gemm_floor"))
            out.append(
                f"| {engine} | {est} | {n} | {h} | {v} "
                f"| {fmt(e.get('ratio_floor'))} {_mark(e.get('ratio_floor'), 1.05)} "
                f"| {fmt(over_trl)} {_mark(over_trl, 2.5, low=True) if est in LOSS_ESTIMATORS else ''} "
                f"| {fmt(trl_floor)} "
                f"| {fmt(speedup)} {_mark(speedup, 2.0, low=True)} | {fmt(liger_floor)} | {fmt(naive_floor)} "
                f"| {mems} "
                f"| {fmt(e.get('peak_extra_over_nv'), '.3f')} "
                f"{_mark(e.get('peak_extra_over_nv'), 0.125) if (n, v) == MEMORY_TARGET_SHAPE else ''} |"
            )
    return "\n".join(out) + "\n"


MEMORY_TARGET_SHAPE = (16384, 32768)  # (N, V) where the peak-memory target is set (memory preset)


def _mark(value: float | None, target: float, low: bool = False) -> str:
    if value is None:
        return ""
    return "(ok)" if (value >= target if low else value <= target) else "(miss)"


def plot(result: dict[str, Any], out_dir: Path, tag: str) -> list[Path]:
    """One PNG per (V, H, dtype): time vs N and peak extra memory vs N, one line per implementation."""
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    rows = result["rows"]
    for v, h, dtype in sorted({(r["v"], r["h"], r["dtype"]) for r in rows}):
        sel = [r for r in rows if (r["v"], r["h"], r["dtype"]) == (v, h, dtype)]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
        for impl, est in sorted({(r["impl"], r["estimator"]) for r in sel}, key=lambda k: (k[1], IMPLS.index(k[0]))):
            line = sorted((r for r in sel if (r["impl"], r["estimator"]) == (impl, est)), key=lambda r: r["n"])
            style = dict(linestyle=LINE_STYLE[est], marker=MARKER[est],
                         color=f"C{IMPLS.index(impl)}", label=f"{impl} ({est})")
            pts = [(r["n"], r["time_s"]) for r in line if r["status"] == "ok" and r.get("time_s")]
            if pts:
                ax_t.plot(*zip(*pts, strict=True), **style)
            pts = [(r["n"], r["peak_extra_bytes"] / MIB) for r in line if r.get("peak_extra_bytes") is not None]
            if pts:
                ax_m.plot(*zip(*pts, strict=True), **style)
        ns = sorted({r["n"] for r in sel})
        ax_m.plot(ns, [n * v * 4 / MIB for n in ns], "k:", marker="_", markersize=16, label="one [N, V] fp32")
        ax_m.plot(ns, [n * v * 4 / MIB / 8 for n in ns], color="grey", linestyle=":", marker="_", markersize=16,
                  label="1/8 [N, V] fp32")
        for ax, ylabel in ((ax_t, "forward + backward time (s)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
        fig.suptitle(f"vold kernel benchmark ({tag}): V={v}, H={h}, {dtype}, {result['machine']['gpu'] or 'CPU'}")
        fig.tight_layout()
        path = out_dir / f"kernels_{tag}_V{v}_H{h}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
