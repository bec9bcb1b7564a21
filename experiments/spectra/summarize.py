"""Study 4 summary: results/spectra/summary.md from the `peftlab analyze` outputs run.sh wrote.

    python experiments/spectra/summarize.py results/spectra

1. Effective / stable / 90%-energy rank of ΔW on the query and value matrices (the ones LoRA adapts),
   for full fine-tuning and LoRA r=8, r=64: mean over modules, then mean ± std over seeds.
2. Subspace similarity φ (LoRA paper eq. 4) between the top right-singular directions of two runs'
   ΔW, r=8 vs r=64 (Fig. 3) and seed 0 vs seed 1 (Fig. 4), with what random subspaces would give.
3. Amplification (LoRA Table 7): ||ΔW||_F / ||Uᵀ W0 Vᵀ||_F, U, V the top-r singular directions of ΔW.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

QV = ("attention.self.query", "attention.self.value")  # BERT's q and v projections


def rank_rows(out: Path) -> pd.DataFrame:
    rows = []
    for folder in sorted(out.glob("*_s[0-9]")):
        ranks = out / folder.name / "ranks.csv"
        if not ranks.exists():
            continue
        frame = pd.read_csv(ranks)
        frame = frame[frame["kind"].isin(QV)]
        label, seed = folder.name.rsplit("_s", 1)
        rows.append({"run": label, "seed": int(seed), "modules": len(frame),
                     "effective_rank": frame["effective_rank"].mean(), "stable_rank": frame["stable_rank"].mean(),
                     "energy_rank_90": frame["energy_rank_90"].mean(), "frobenius": frame["frobenius_norm"].mean()})
    return pd.DataFrame(rows)


def similarity_rows(out: Path, dim: int = 384) -> pd.DataFrame:
    rows = []
    for csv in sorted(out.glob("*_vs_*/similarity_*.csv")):
        frame = pd.read_csv(csv)
        frame = frame[frame["module"].str.contains("|".join(QV))]
        top = frame[(frame["i"] == 1) & (frame["j"] == 1)]["phi"].mean()
        small = frame[(frame["i"] <= 8) & (frame["j"] <= 8)]
        by_i = small[small["j"] == 8].groupby("i")["phi"].mean()
        rows.append({"comparison": csv.parent.name, "phi(1,1)": top, "mean phi(i<=8, j<=8)": small["phi"].mean(),
                     "phi(i=8, j=8)": by_i.get(8), "random phi(8,8)": 8 / dim})
    return pd.DataFrame(rows)


def amplification_rows(out: Path) -> pd.DataFrame:
    rows = []
    for csv in sorted(out.glob("lora_r*_s[0-9]/amplification.csv")):
        frame = pd.read_csv(csv)
        frame = frame[frame["module"].str.contains("|".join(QV))]
        label, seed = csv.parent.name.rsplit("_s", 1)
        rows.append({"run": label, "seed": int(seed), "r": int(frame["r"].iloc[0]),
                     "‖ΔW‖F": frame["norm_delta"].mean(), "‖UᵀW0Vᵀ‖F": frame["proj_delta"].mean(),
                     "top-r of W0": frame["proj_w0_top"].mean(), "random": frame["proj_random"].mean(),
                     "amplification": frame["amplification"].mean()})
    return pd.DataFrame(rows)


def mean_std(frame: pd.DataFrame, by: str, columns: list[str]) -> pd.DataFrame:
    grouped = frame.groupby(by)
    table = pd.DataFrame({"seeds": grouped.size()})
    for column in columns:
        mean, std = grouped[column].mean(), grouped[column].std()
        table[column] = [f"{m:.3g} ± {s:.2g}" if pd.notna(s) else f"{m:.3g}" for m, s in zip(mean, std)]
    return table.reset_index()


def markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (floats to 3 significant digits; no tabulate needed)."""
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main(out: Path) -> int:
    parts = ["# Spectra of ΔW (study 4): summary", ""]
    ranks = rank_rows(out)
    if len(ranks):
        parts += ["## Ranks of ΔW on q, v (mean over the 12 q/v matrices; mean ± std over seeds)", "",
                  markdown(mean_std(ranks, "run", ["modules", "effective_rank", "stable_rank", "energy_rank_90",
                                                    "frobenius"])), ""]
    similarity = similarity_rows(out)
    if len(similarity):
        parts += ["## Subspace similarity φ of the top right-singular directions (q, v; mean over modules)", "",
                  markdown(similarity), ""]
    amplification = amplification_rows(out)
    if len(amplification):
        parts += ["## Amplification (LoRA Table 7 quantities; mean over q, v modules; mean ± std over seeds)", "",
                  markdown(mean_std(amplification, "run", ["r", "‖ΔW‖F", "‖UᵀW0Vᵀ‖F", "top-r of W0",
                                                           "random", "amplification"])), ""]
    (out / "summary.md").write_text("\n".join(parts), encoding="utf-8")
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/spectra")))
