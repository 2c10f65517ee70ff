"""The arms of the demo's ablation (what each trains, how the report shows it) and the two benchmarks.

A module of its own so that the pipeline (which runs the arms), the report (which reads them) and the config
(which checks ``arms=`` and counts an arm's steps) import it, and not each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """One arm of the ablation: how its model is made, and how the report shows it."""

    key: str
    label: str
    short: str  # legend of the plots
    color: str
    marks: tuple[str, str, str]  # the table's columns: cold start, GRPO, distillation
    start: str | None = None  # "base" (perception student) | "sft" (cold start) | None: not a training run
    trainer: str = "rl"  # "rl" (`vold train`) | "sophia" (`vold sophia`)
    estimator: str | None = None  # distillation estimator of an RL arm (None: no distillation)
    images: bool = False  # trains on the train problems as images (else as text)

    @property
    def run(self) -> str:
        """The stage's run folder under the arm (``vold train`` -> rl, ``vold sophia`` -> sophia)."""
        return self.trainer


ARMS = [
    Arm("a_base", "(a) student, perception only", "(a) base", "#7f7f7f", ("", "", "")),
    Arm("b_sft", "(b) + cold-start SFT on teacher traces", "(b) SFT", "#bcbd22", ("✓", "", "")),
    Arm("c_sft_grpo", "(c) SFT + GRPO", "(c) SFT+GRPO", "#1f77b4", ("✓", "✓", ""), start="sft"),
    Arm("d_grpo_distill", "(d) GRPO + distillation (k2), no cold start", "(d) GRPO+KD (k2)", "#9467bd",
        ("", "✓", "k2"), start="base", estimator="k2"),
    Arm("e_vold_k2", "(e) VOLD: SFT + GRPO + distillation (k2)", "(e) VOLD k2", "#d62728", ("✓", "✓", "k2"),
        start="sft", estimator="k2"),
    Arm("e_vold_full", "(e) VOLD: SFT + GRPO + distillation (full KL)", "(e) VOLD full", "#ff7f0e",
        ("✓", "✓", "full"), start="sft", estimator="full"),
    Arm("f_sft_grpo_images", "(f) RL with cold start: SFT + GRPO on images (k3 ref. KL)", "(f) SFT+GRPO images",
        "#17becf", ("✓", "✓ images", ""), start="sft", images=True),
    Arm("g_sophia", "(g) SOPHIA: student captions + teacher traces, on images", "(g) SOPHIA", "#2ca02c",
        ("", "", "teacher traces"), start="base", trainer="sophia", images=True),
]
TRAINED_ARMS = [arm for arm in ARMS if arm.start is not None]
RL_ARMS = [arm for arm in TRAINED_ARMS if arm.trainer == "rl"]
BENCHMARKS = ("image", "text")
