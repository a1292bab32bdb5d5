"""Tables and figures from `vision/average.py` outputs (thesis Tables 4.1 / 5.1, Figs. 4.6 and 5.4).

    python vision/average.py sweep_dir=DIR      # writes DIR/average/*.jsonl, then calls collect(DIR)

`collect(sweep_dir)` writes into `<sweep_dir>/tables/` (atomically):
- `accuracy.md` / `accuracy.csv`: test-domain accuracy (%) per group and method, one column per test domain
  and their average, mean ± std over trials (std with ddof=0 over the trials present; "±0.0" for one trial);
- `diversity.md` / `diversity.csv`: ratio-error, Q-diversity of the members and the WA gain over the mean
  member, per group;
- `diversity_gain.png`: WA gain of random member pairs against their diversity (Fig. 4.6);
- `lmc.png`: accuracy along (1 - λ) θ_a + λ θ_b between the two best members of each group (Fig. 5.4).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soups.utils import SoupsError, atomic_dir

METHODS = ("erm", "member_mean", "ma", "ens", "uniform", "greedy", "dagger")
LABELS = {"erm": "ERM (ID val)", "member_mean": "mean member", "ma": "MA", "ens": "ENS*",
          "uniform": "uniform", "greedy": "greedy", "dagger": "† (all trials)"}
DIVERSITY = ("ratio_error", "q_diversity", "wa_gain")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0) of finite values; (nan, nan) when none.

    Example: [0.8, 0.9] -> mean 0.85, std sqrt(((0.05)^2 + (0.05)^2) / 2) = 0.05.
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def accuracy_table(
    rows: Sequence[dict[str, Any]], domains: Sequence[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the accuracy table: group, method, one "mean ± std" cell per test domain, then Avg.

    The Avg column averages, per trial, the test domains' accuracies, then takes mean ± std over trials.
    """
    envs = sorted({tuple(r["test_envs"]) for r in rows})
    names = [("+".join(domains[i] for i in e) if domains else f"env{'+'.join(map(str, e))}") for e in envs]
    header = ["group", "method", *names, "Avg"]
    out = []
    order = ("diwa", "ratatouille", "inter_training", "fusing")
    for group in sorted({r["group"] for r in rows}, key=lambda g: order.index(g) if g in order else len(order)):
        for method in METHODS:
            per_env = {
                e: {r["trial"]: r.get(method) for r in rows if r["group"] == group and tuple(r["test_envs"]) == e}
                for e in envs
            }
            if not any(v is not None for d in per_env.values() for v in d.values()):
                continue
            cells = []
            for e in envs:
                m, s = mean_std(list(per_env[e].values()))
                cells.append("–" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}")
            trials = sorted({t for d in per_env.values() for t in d})
            avgs = []
            for t in trials:
                vals = [per_env[e].get(t) for e in envs]
                if all(v is not None for v in vals):
                    avgs.append(sum(vals) / len(vals))  # type: ignore[arg-type]
            m, s = mean_std(avgs)
            cells.append("–" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}")
            out.append([group, LABELS[method], *cells])
    return header, out


def diversity_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per group, mean ± std over (test domain, trial) of ratio-error, Q-diversity, WA gain."""
    header = ["group", "ratio-error", "Q-diversity", "WA gain (pts)"]
    out = []
    for group in sorted({r["group"] for r in rows}):
        cells = [group]
        for key in DIVERSITY:
            scale = 100.0 if key == "wa_gain" else 1.0
            m, s = mean_std([r.get(key) for r in rows if r["group"] == group])
            cells.append("–" if math.isnan(m) else f"{scale * m:.3f} ± {scale * s:.3f}")
        out.append(cells)
    return header, out


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """CSV text."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _plot_pairs(pairs: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in zip(axes, ("ratio_error", "q_diversity"), ("ratio-error", "Q-diversity")):
        for group in sorted({p["group"] for p in pairs}):
            pts = [(p[key], 100 * p["wa_gain"]) for p in pairs if p["group"] == group and math.isfinite(p[key])]
            if pts:
                ax.scatter(*zip(*pts), label=group, s=14, alpha=0.7)
        ax.set_xlabel(f"{label} (pair, test domain)")
        ax.set_ylabel("WA gain over pair mean (pts)")
        ax.axhline(0, color="grey", lw=0.5)
    if axes[0].get_legend_handles_labels()[0]:  # no finite point (e.g. one pair of one group): no legend to draw
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_lmc(curves: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for c in curves:
        lam = [p["lambda"] for p in c["curve"]]
        acc = [100 * p["test_acc"] for p in c["curve"]]
        ax.plot(lam, acc, marker=".", label=f"{c['group']} env{c['test_envs']} t{c['trial']}")
    ax.set_xlabel("λ in (1-λ) θ_a + λ θ_b")
    ax.set_ylabel("test-domain accuracy (%)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect(sweep_dir: str | Path) -> Path:
    """Writes `<sweep_dir>/tables/` from `<sweep_dir>/average/`; returns the tables directory.

    Raises:
        SoupsError: no `average/results.jsonl` (run vision/average.py first).
    """
    sweep_dir = Path(sweep_dir)
    rows = _read_jsonl(sweep_dir / "average" / "results.jsonl")
    if not rows:
        raise SoupsError(f"no averaging results in {sweep_dir / 'average' / 'results.jsonl'}; run vision/average.py")
    domains = rows[0].get("domains")
    acc_header, acc_rows = accuracy_table(rows, domains)
    div_header, div_rows = diversity_table(rows)
    with atomic_dir(sweep_dir / "tables", overwrite=True) as tmp:
        title = f"{rows[0].get('dataset', '')}: test-domain accuracy (%), mean ± std over trials\n\n"
        (tmp / "accuracy.md").write_text(title + to_markdown(acc_header, acc_rows))
        (tmp / "accuracy.csv").write_text(to_csv(acc_header, acc_rows))
        (tmp / "diversity.md").write_text(to_markdown(div_header, div_rows))
        (tmp / "diversity.csv").write_text(to_csv(div_header, div_rows))
        pairs = _read_jsonl(sweep_dir / "average" / "pairs.jsonl")
        if pairs:
            _plot_pairs(pairs, tmp / "diversity_gain.png")
        curves = _read_jsonl(sweep_dir / "average" / "lmc.jsonl")
        if curves:
            _plot_lmc(curves, tmp / "lmc.png")
    print(title + to_markdown(acc_header, acc_rows) + "\n" + to_markdown(div_header, div_rows))
    return sweep_dir / "tables"
