"""The demo's results: a markdown table in the paper's style, ``results.json`` and the plots.

Accuracy is ``mean@k`` of ``vold eval`` (the k-sample estimate of pass@1) on the held-out problems,
shown as mean ± standard deviation over the seeds. "reads image" is the share of image completions
whose first line is the problem read correctly (the restatement), a perception check.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from vold.demo.arms import ARMS, BENCHMARKS, TRAINED_ARMS
from vold.demo.config import DemoConfig, as_dict, steps_of
from vold.runs import distill_metric, read_jsonl

ARM = {arm.key: arm for arm in ARMS}
# the training reward plotted per trainer: GRPO's mean rollout reward; SOPHIA's mean reward of the teacher's
# traces written from the student's captions (the caption reward, averaged over the step's captions)
REWARD_METRIC = {"rl": "reward/mean", "sophia": "caption/reward_mean"}


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt(values: list[float], scale: float = 100.0) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{scale * mean:.1f} ± {scale * std:.1f}" if len(values) > 1 else f"{scale * mean:.1f}"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def accuracy(result: dict[str, Any], benchmark: str) -> float:
    return float(result["summary"][benchmark]["mean@k"])


def collect(out: Path, dc: DemoConfig) -> dict[str, Any]:
    """Every number of the run, read back from the stages' output folders."""
    arms: dict[str, Any] = {}
    for arm in ARMS:
        key, label = arm.key, arm.label
        per_seed = [_load(out / f"seed_{s}" / key / "eval" / "demo_eval.json") for s in range(dc.seeds)]
        per_seed = [r for r in per_seed if r is not None]
        arms[key] = {
            "label": label,
            **{b: [accuracy(r, b) for r in per_seed] for b in BENCHMARKS},
            "reads_image": [r["reads"]["image"] for r in per_seed],
            "pass@k_image": [float(r["summary"]["image"]["pass@k"]) for r in per_seed],
            "mean_length_image": [float(r["summary"]["image"]["mean_length"]) for r in per_seed],
        }
    teacher = _load(out / "teacher" / "eval" / "demo_eval.json")
    curves: dict[str, Any] = {}
    for arm in TRAINED_ARMS:
        key, runs = arm.key, []
        for s in range(dc.seeds):
            root = out / f"seed_{s}"
            metrics_file = root / key / arm.run / "metrics.jsonl"
            metrics = read_jsonl(metrics_file) if metrics_file.is_file() else []
            start_eval = _load(root / ("b_sft" if arm.start == "sft" else "a_base") / "eval" / "demo_eval.json")
            points = [(0, start_eval)] if start_eval else []
            for folder in sorted((root / key / "curve").glob("step_*")):
                result = _load(folder / "demo_eval.json")
                if result:
                    points.append((int(folder.name.split("_")[1]), result))
            final = _load(root / key / "eval" / "demo_eval.json")
            if final:
                points.append((steps_of(dc, arm), final))
            runs.append({
                "step": [m["step"] for m in metrics],
                "reward": [m[REWARD_METRIC[arm.trainer]] for m in metrics],
                # distill/reverse_kl (full: the exact KL) or distill/k2 (its estimate): vold.runs.distill_metric
                "distill_kl": [m.get(distill_metric(arm.estimator), math.nan) if arm.estimator else math.nan
                               for m in metrics],
                "eval_step": [p[0] for p in points],
                **{f"eval_{b}": [accuracy(p[1], b) for p in points] for b in BENCHMARKS},
            })
        curves[key] = runs
    traces = [_load(out / f"seed_{s}" / "traces" / "stats.json") for s in range(dc.seeds)]
    eval_answers = [row["answer"] for row in read_jsonl(out / "data" / "text.jsonl")]
    majority = Counter(eval_answers).most_common(1)[0][1] / len(eval_answers)
    return {"arms": arms, "teacher_text": [accuracy(teacher, "text")] if teacher else [], "curves": curves,
            "traces": [t for t in traces if t], "majority_answer": majority}


# the premises under which the paper makes its claims (issue 16), checked on the run itself
P_READS_A, P_READS_B, P_REWARD_RISE, P_DISTILL_FALL = 0.95, 0.90, 0.05, 0.9
PREMISES = {
    "P1": "the student sees: (a) reads the image problems",
    "P2": "text-only post-training leaves perception intact: (b) still reads the image problems",
    "P3": "the student can execute what it imitates: (b)'s text accuracy above (a)'s (mean within-seed difference)",
    "P4": "RL learns: (c)'s training reward, last 20 steps minus first 20 (mean over seeds); and D_t of each (e) "
          "arm falls (last 20 / first 20 steps)",
}


def _ends(values: list[float], window: int = 20) -> tuple[float, float]:
    """Means of the first and the last ``window`` finite values (half the run each when it is shorter)."""
    finite = [v for v in values if not math.isnan(v)]
    k = max(1, min(window, len(finite) // 2))
    if len(finite) < 2:
        return math.nan, math.nan
    return sum(finite[:k]) / k, sum(finite[-k:]) / k


def premises(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """P1-P4 measured on the run: ``{"P1": {"value", "threshold", "holds", "what"}, ...}`` (fractions, not %).

    P1: mean over seeds of (a)'s "reads image" >= 0.95. P2: the same for (b) >= 0.90. P3: mean over seeds of
    text acc. (b) - (a) > 0. P4: mean over seeds of (c)'s reward/mean, mean of the last 20 steps minus the first
    20, >= 0.05, *and* for each (e) arm the mean over seeds of D_t's last-20 / first-20 ratio <= 0.9 (``distill``).
    A premise whose arms did not run has value NaN (written as null) and does not hold.
    """
    arms, curves = data["arms"], data["curves"]

    def mean(values: list[float]) -> float:
        return mean_std(values)[0]

    def entry(value: float, threshold: float, holds: bool, **extra: Any) -> dict[str, Any]:
        value = None if math.isnan(value) else value
        return {"value": value, "threshold": threshold, "holds": bool(value is not None and holds), **extra}

    p1 = mean(arms["a_base"]["reads_image"])
    p2 = mean(arms["b_sft"]["reads_image"])
    a_text, b_text = arms["a_base"]["text"], arms["b_sft"]["text"]
    p3 = mean([b - a for a, b in zip(a_text, b_text, strict=False)]) if len(a_text) == len(b_text) else math.nan
    rises = [last - first for first, last in (_ends(r["reward"]) for r in curves.get("c_sft_grpo", []))]
    p4 = mean([r for r in rises if not math.isnan(r)])
    distill: dict[str, Any] = {}
    for arm in TRAINED_ARMS:
        if arm.key.startswith("e_"):
            ratios = [last / first for first, last in (_ends(r["distill_kl"]) for r in curves.get(arm.key, []))
                      if first > 0]
            ratio = mean(ratios)
            distill[arm.key] = {"value": None if math.isnan(ratio) else ratio, "threshold": P_DISTILL_FALL,
                                "holds": bool(ratio <= P_DISTILL_FALL)}
    falls = bool(distill) and all(d["holds"] for d in distill.values())
    out = {"P1": entry(p1, P_READS_A, p1 >= P_READS_A), "P2": entry(p2, P_READS_B, p2 >= P_READS_B),
           "P3": entry(p3, 0.0, p3 > 0.0), "P4": entry(p4, P_REWARD_RISE, p4 >= P_REWARD_RISE and falls,
                                                      reward_rise_per_seed=rises, distill=distill)}
    for key, what in PREMISES.items():
        out[key]["what"] = what
    return out


def premises_markdown(found: dict[str, dict[str, Any]]) -> str:
    """The premises as a table (values in %, or percentage points for P3 and P4's reward rise)."""
    lines = ["\nPremises (issue 16), measured on this run:\n", "| premise | what | value | threshold | holds |",
             "|---|---|--:|--:|:-:|"]
    for key, p in found.items():
        value = "–" if p["value"] is None else f"{100 * p['value']:.1f}"
        if key == "P4":
            parts = []
            for arm, d in p["distill"].items():
                ratio = "–" if d["value"] is None else f"{d['value']:.2f}"
                parts.append(f"D_t {ARM[arm].short} {ratio}")
            value += f"; {', '.join(parts)} (≤ {P_DISTILL_FALL:g})" if parts else ""
        op = ">" if key == "P3" else "≥"
        lines.append(f"| {key} | {p['what']} | {value} | {op} {100 * p['threshold']:g} | "
                     f"{'yes' if p['holds'] else 'no'} |")
    return "\n".join(lines) + "\n"


def markdown(data: dict[str, Any], dc: DemoConfig) -> str:
    header = ["arm", "cold start", "GRPO", "from the teacher", "image acc. (%)", "text acc. (%)", "reads image (%)"]
    lines = ["| " + " | ".join(header) + " |", "|---|:-:|:-:|:-:|--:|--:|--:|"]
    for arm in ARMS:
        row = data["arms"][arm.key]
        lines.append("| " + " | ".join([arm.label, *arm.marks, fmt(row["image"]), fmt(row["text"]),
                                         fmt(row["reads_image"])]) + " |")
    lines.append("| teacher (text-only LLM), for reference | | | | n/a | " + fmt(data["teacher_text"]) + " | n/a |")
    kept = [t["kept"] / max(t["prompts"], 1) for t in data["traces"]]
    notes = (f"\nAccuracy: mean@{dc.eval_samples} (temperature {dc.eval_temperature}, top-p {dc.eval_top_p}) on "
             f"{dc.eval_problems} held-out problems, shown as images and as text; mean ± std over {dc.seeds} "
             f"seed{'s' if dc.seeds > 1 else ''}. Arms (b)-(e) train on text only; (f) and (g) on the RL "
             f"problems shown as images. Always answering the most frequent "
             f"answer scores {100 * data['majority_answer']:.1f}%. Cold start: {dc.sft_steps} SFT steps on teacher "
             f"traces of {dc.train_problems} text prompts ({100 * mean_std(kept)[0]:.0f}% of them solved by the "
             f"teacher and kept); RL: {dc.rl_steps} steps x {dc.rl_batch} prompts x {dc.num_generations} rollouts, "
             f"on the first {dc.rl_problems} of those prompts, lr {dc.rl_lr:g}, "
             f"beta {dc.distill_coef:g} on wrong rollouts (1 - r); (f) k3 reference KL "
             f"{dc.images_ref_kl_coef:g}. SOPHIA: {dc.sophia_steps} steps x {dc.sophia_batch} images, "
             f"K = {dc.sophia_captions} captions x N = {dc.sophia_traces} teacher traces, alpha {dc.sophia_alpha:g}, "
             f"ratio-1 update, lr {dc.sophia_lr:g}. Student: a {dc.student_layers}-layer width-{dc.student_hidden} LM "
             f"pre-trained on the primitive operations ({dc.lm_steps} steps), vision aligned to its text embeddings "
             f"then frozen, eyes {dc.perception_steps} steps; teacher {dc.teacher_layers} x {dc.teacher_hidden}. "
             f"\"reads image\": first line of an image completion = the "
             f"problem.\n")
    return "\n".join(lines) + "\n" + notes + premises_markdown(premises(data)) + paired(data)


PAIRS = [("e_vold_full", "c_sft_grpo", "distillation (full) on top of SFT + GRPO"),
         ("e_vold_k2", "c_sft_grpo", "distillation (k2) on top of SFT + GRPO"),
         ("e_vold_full", "e_vold_k2", "full reverse KL instead of k2"),
         ("c_sft_grpo", "b_sft", "GRPO after the cold start"),
         ("b_sft", "a_base", "the cold start"),
         ("d_grpo_distill", "a_base", "GRPO + distillation without cold start"),
         ("f_sft_grpo_images", "c_sft_grpo", "GRPO on the image prompts instead of text"),
         ("e_vold_full", "f_sft_grpo_images", "VOLD (text) vs RL with cold start (images)"),
         ("g_sophia", "a_base", "SOPHIA from the perception student")]


def paired(data: dict[str, Any]) -> str:
    """Within-seed differences (arms of one seed share the perception student, traces and SFT model)."""
    arms = data["arms"]
    pairs = [(a, b, what) for a, b, what in PAIRS
             if a in arms and b in arms and len(arms[a]["text"]) == len(arms[b]["text"]) >= 2]
    if not pairs:
        return ""
    lines = ["\nWithin-seed differences (percentage points, mean ± std over seeds; per seed in brackets):\n",
             "| comparison | what it isolates | image | text |", "|---|---|--:|--:|"]
    for a, b, what in pairs:
        cells = []
        for bench in BENCHMARKS:
            diffs = [x - y for x, y in zip(arms[a][bench], arms[b][bench], strict=True)]
            cells.append(f"{fmt(diffs)} [{', '.join(f'{100 * d:+.1f}' for d in diffs)}]")
        lines.append(f"| {ARM[a].short} − {ARM[b].short} | {what} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        finite = [a for a in acc if not math.isnan(a)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def _band(runs: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    n = min((len(r) for r in runs), default=0)
    means, lows, highs = [], [], []
    for i in range(n):
        mean, std = mean_std([r[i] for r in runs])
        means.append(mean)
        lows.append(mean - std)
        highs.append(mean + std)
    return means, lows, highs


def plot_bars(ax, data: dict[str, Any]) -> None:
    keys = [a.key for a in ARMS]
    width = 0.38
    for j, bench in enumerate(BENCHMARKS):
        xs = [i + (j - 0.5) * width for i in range(len(keys))]
        stats = [mean_std(data["arms"][k][bench]) for k in keys]
        ax.bar(xs, [100 * m for m, _ in stats], width, yerr=[100 * s for _, s in stats], capsize=3,
               color=[ARM[k].color for k in keys], alpha=1.0 if bench == "image" else 0.45,
               edgecolor="black", linewidth=0.6, label=f"{bench} problems")
    if data["teacher_text"]:
        ax.axhline(100 * mean_std(data["teacher_text"])[0], color="black", linestyle="--", linewidth=1,
                   label="teacher (text)")
    ax.axhline(100 * data["majority_answer"], color="gray", linestyle=":", linewidth=1, label="majority answer")
    ax.set_xticks(range(len(keys)), [ARM[k].short for k in keys], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy: images (solid) and text (light)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left")


def plot_reward(ax, data: dict[str, Any], window: int) -> None:
    for key, runs in data["curves"].items():
        runs = [r for r in runs if r["reward"]]
        if not runs:
            continue
        mean, low, high = _band([_smooth(r["reward"], window) for r in runs])
        steps = runs[0]["step"][:len(mean)]
        ax.plot(steps, [100 * v for v in mean], color=ARM[key].color, label=ARM[key].short)
        ax.fill_between(steps, [100 * v for v in low], [100 * v for v in high], color=ARM[key].color, alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training reward (%, moving avg {window})")
    ax.set_title("training reward: GRPO rollouts; SOPHIA: teacher traces\nfrom the student's captions", fontsize=9)
    ax.legend(fontsize=7)


def plot_curves(ax, data: dict[str, Any]) -> None:
    for key, runs in data["curves"].items():
        runs = [r for r in runs if r["eval_step"]]
        if not runs:
            continue
        for bench, style in (("image", "-"), ("text", ":")):
            mean, low, high = _band([r[f"eval_{bench}"] for r in runs])
            steps = runs[0]["eval_step"][:len(mean)]
            ax.plot(steps, [100 * v for v in mean], style, marker="o", markersize=3, color=ARM[key].color,
                    label=ARM[key].short if bench == "image" else None)
            if bench == "image":
                ax.fill_between(steps, [100 * v for v in low], [100 * v for v in high], color=ARM[key].color,
                                alpha=0.12)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("held-out accuracy: images (solid), text (dotted)")
    ax.legend(fontsize=7, framealpha=0.6)


def plot_distill(ax, data: dict[str, Any], window: int) -> None:
    for key, runs in data["curves"].items():
        runs = [r for r in runs if r["distill_kl"] and not all(math.isnan(v) for v in r["distill_kl"])]
        if not runs or ARM[key].estimator is None:
            continue
        mean, low, high = _band([_smooth(r["distill_kl"], window) for r in runs])
        steps = runs[0]["step"][:len(mean)]
        ax.plot(steps, mean, color=ARM[key].color, label=ARM[key].short)
        ax.fill_between(steps, low, high, color=ARM[key].color, alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("RL step")
    ax.set_ylabel("distillation term D_t (nats/token)")
    ax.set_title("D_t: k2 = ½(log p − log q)² of the sampled token,\nfull = exact KL(p‖q)", fontsize=9)
    ax.legend(fontsize=7)


def write_plots(out: Path, data: dict[str, Any], dc: DemoConfig) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, max(dc.rl_steps, dc.sophia_steps) // 15)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    for name, draw, size in (("accuracy", lambda ax: plot_bars(ax, data), (7, 4.5)),
                             ("accuracy_vs_step", lambda ax: plot_curves(ax, data), (6, 4.5)),
                             ("reward_vs_step", lambda ax: plot_reward(ax, data, window), (6, 4.5)),
                             ("distill_kl_vs_step", lambda ax: plot_distill(ax, data, window), (6, 4.5))):
        fig, ax = plt.subplots(figsize=size)
        draw(ax)
        fig.tight_layout()
        fig.savefig(plots / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(plots / f"{name}.png")
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    plot_bars(axes[0, 0], data)
    plot_curves(axes[0, 1], data)
    plot_reward(axes[1, 0], data, window)
    plot_distill(axes[1, 1], data, window)
    fig.suptitle(f"vold demo: VOLD ablation on a toy task (text-trained, image-evaluated), {dc.seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(out / "figure.png", dpi=110)
    plt.close(fig)
    written.append(out / "figure.png")
    return written


def write_report(out: Path, dc: DemoConfig, *, cached: dict[str, Any], seconds: dict[str, float],
                 elapsed: float) -> dict[str, Any]:
    data = collect(out, dc)
    table = markdown(data, dc)
    (out / "results.md").write_text("# vold demo: results\n\n" + table, encoding="utf-8")
    write_plots(out, data, dc)
    results = {"premises": premises(data), "table": table, "config": as_dict(dc), "cached_models": cached,
               "seconds": seconds, "elapsed_s": elapsed, **data}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


def rebuild_report(out: str | Path) -> dict[str, Any]:
    """Re-read a finished run folder and rewrite its table, ``results.json`` and figures (no training)."""
    import yaml

    out = Path(out)
    dc = DemoConfig(**yaml.safe_load((out / "demo.yaml").read_text(encoding="utf-8")))
    old = _load(out / "results.json") or {}
    return write_report(out, dc, cached=old.get("cached_models", {}), seconds=old.get("seconds", {}),
                        elapsed=old.get("elapsed_s", math.nan))
