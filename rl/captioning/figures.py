"""The captioning family's own tables and figures (thesis §6.3.2), made from fronts written by `soups.pareto`.

- **Uniform-soup table** (`uniform_table`): the soup of all experts with λ = 1/N against the init and each expert,
  on every metric, from a front evaluated with `grid.n_points=N grid.uniform=true`.
- **HV, RS vs MORL on the BLEU1–ROUGE-L pair** (`pair_hypervolumes`): 2-D hypervolume of the soups of the two
  experts and of the MORL runs, min-max normalised over every point (init included), reference the origin.
- **Fig. 6.4(a)** (`preference_figure`): for each user preference μ on a grid, the λ maximising
  (1 − μ)·BLEU1 + μ·ROUGE-L (each min-max normalised over the soups) on the *validation* front, plotted against μ,
  with the *test* score of that λ beside the best test score (what an oracle picking on test would get).
- **Fig. 6.4(b)** (`metrics_figure`): every metric (min-max normalised) of the test front as a function of λ.
- **The conflict** (`expert_conflict`): is each expert best, among the experts, on its own metric beyond stderr?
  The experts caption the SAME test images, so the margin of an expert over a rival is judged with a *paired*
  bootstrap (`paired_difference_stderr`: both corpus scores recomputed on the same resampled images, BLEU
  re-aggregated from its n-gram statistics); the independent stderr √(se_a² + se_b²) is reported beside it.

`after_front` is the quickstart's hook (`soups.quickstart_registry.Recipe.after_front`): it evaluates the uniform
soup and the pair fronts on validation and test with `python -m soups.pareto` (each a subprocess) and writes
everything under `<output_dir>/captioning/`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evals.captioning import CorpusScores, bleu_from_stats
from evals.pareto import hypervolume
from soups.quickstart_registry import hydra_list, hydra_value
from soups.utils import SoupsError, write_json

__all__ = [
    "after_front",
    "corpus_statistic",
    "expert_conflict",
    "metrics_figure",
    "pair_hypervolumes",
    "paired_difference_stderr",
    "preference_figure",
    "read_front",
    "uniform_table",
]

# Expert (reward) name -> the metric of `evals.captioning` it optimises (as rl.captioning.rewards.REWARDS, which
# imports torch; this module must not).
OWN_METRIC = {"bleu1": "bleu1", "bleu2": "bleu2", "bleu3": "bleu3", "bleu4": "bleu4", "meteor": "meteor",
              "rouge": "rouge_l", "rouge_l": "rouge_l", "cider": "cider"}  # fmt: skip


def read_front(front_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of `<front_dir>/front.jsonl`."""
    path = Path(front_dir) / "front.jsonl"
    if not path.is_file():
        raise SoupsError(f"{path} not found: run python -m soups.pareto first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(row: Mapping[str, Any], objective: str) -> float:
    return float(row["objectives"][objective]["mean"])


def uniform_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The uniform soup vs the init and each expert on every metric.

    Returns:
        {"objectives", "rows": [{"name", "kind", metric: mean, metric_stderr: ...}], "soup_beats_init": {metric: bool},
        "markdown": the table}.
    """
    soups = [r for r in rows if r["kind"] == "soup" and r["lambda"] is not None
             and np.allclose(r["lambda"], 1.0 / len(r["lambda"]))]  # fmt: skip
    inits = [r for r in rows if r["kind"] == "init"]
    if not soups:
        raise SoupsError("the front has no uniform soup (evaluate it with grid.uniform=true)")
    objectives = list(rows[0]["objectives"])
    chosen = [*inits, *[r for r in rows if r["kind"] == "expert"], soups[0]]
    table = []
    for r in chosen:
        name = "uniform soup" if r is soups[0] else str(r["name"])
        entry: dict[str, Any] = {"name": name, "kind": r["kind"]}
        for o in objectives:
            entry[o], entry[f"{o}_stderr"] = _mean(r, o), float(r["objectives"][o]["stderr"])
        table.append(entry)
    beats = {o: _mean(soups[0], o) > _mean(inits[0], o) for o in objectives} if inits else {}
    lines = ["| point | " + " | ".join(objectives) + " |", "|---|" + "---:|" * len(objectives)]
    for e in table:
        cells = " | ".join(f"{e[o]:.3f} ± {e[f'{o}_stderr']:.3f}" for o in objectives)
        lines.append(f"| {e['name']} | {cells} |")
    if beats:
        lines.append("| soup > init | " + " | ".join("yes" if beats[o] else "no" for o in objectives) + " |")
    return {"objectives": objectives, "rows": table, "soup_beats_init": beats, "markdown": "\n".join(lines)}


def _pair_soups(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Expert and soup rows of a 2-expert front, by λ of the second expert."""
    points = [r for r in rows if r["kind"] in ("expert", "soup") and r["lambda"] is not None]
    return sorted(points, key=lambda r: float(r["lambda"][1]))


def pair_hypervolumes(rows: Sequence[Mapping[str, Any]], pair: Sequence[str]) -> dict[str, float]:
    """2-D hypervolume of the soups and of the MORL runs on `pair`, min-max normalised over all points."""
    soups = _pair_soups(rows)
    morl = [r for r in rows if r["kind"] == "morl"]
    everything = [*soups, *morl, *[r for r in rows if r["kind"] == "init"]]
    values = np.array([[_mean(r, o) for o in pair] for r in everything])
    lo, hi = values.min(0), values.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)

    def norm(rs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return (np.array([[_mean(r, o) for o in pair] for r in rs]) - lo) / span

    out = {"rs": hypervolume(norm(soups), np.zeros(len(pair)))}
    if morl:
        out["morl"] = hypervolume(norm(morl), np.zeros(len(pair)))
    return out


def choose_lambdas(rows: Sequence[Mapping[str, Any]], pair: Sequence[str], mus: Sequence[float]) -> list[float]:
    """For each μ, the λ (weight of the second expert) maximising (1 − μ)·n(pair[0]) + μ·n(pair[1]) over the soups,
    each objective min-max normalised over the soups."""
    soups = _pair_soups(rows)
    values = np.array([[_mean(r, o) for o in pair] for r in soups])
    lo, hi = values.min(0), values.max(0)
    normed = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    lambdas = [float(r["lambda"][1]) for r in soups]
    return [lambdas[int(np.argmax((1 - mu) * normed[:, 0] + mu * normed[:, 1]))] for mu in mus]


def preference_figure(
    val_rows: Sequence[Mapping[str, Any]], test_rows: Sequence[Mapping[str, Any]], pair: Sequence[str], path: Path,
    mus: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Fig. 6.4(a): λ chosen on validation for each preference μ, and its test score vs the best test score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mus = list(mus) if mus is not None else [i / 10 for i in range(11)]
    chosen = choose_lambdas(val_rows, pair, mus)
    oracle = choose_lambdas(test_rows, pair, mus)
    test = {float(r["lambda"][1]): r for r in _pair_soups(test_rows)}
    values = np.array([[_mean(r, o) for o in pair] for r in test.values()])
    lo, hi = values.min(0), values.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)

    def score(lam: float, mu: float) -> float:
        n = (np.array([_mean(test[lam], o) for o in pair]) - lo) / span
        return float((1 - mu) * n[0] + mu * n[1])

    got = [score(lam, mu) for lam, mu in zip(chosen, mus)]
    best = [score(lam, mu) for lam, mu in zip(oracle, mus)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.plot(mus, chosen, "o-", label="λ chosen on validation")
    ax1.plot([0, 1], [0, 1], ":", color="grey", label="λ = μ")
    ax1.set(xlabel=f"preference μ (weight of {pair[1]})", ylabel=f"λ (weight of the {pair[1]} expert)",
            title="Fig. 6.4(a): λ from the preference")  # fmt: skip
    ax1.legend(fontsize=8)
    ax2.plot(mus, got, "o-", label="test score at the chosen λ")
    ax2.plot(mus, best, "x--", label="best test score (oracle λ)")
    ax2.set(xlabel="preference μ", ylabel=f"(1−μ)·{pair[0]} + μ·{pair[1]} (normalised)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"mu": mus, "lambda_val": chosen, "lambda_test_oracle": oracle, "test_score": got, "test_best": best}


def metrics_figure(rows: Sequence[Mapping[str, Any]], path: Path) -> dict[str, Any]:
    """Fig. 6.4(b): every metric (min-max normalised over λ) of a 2-expert front as a function of λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    soups = _pair_soups(rows)
    lambdas = [float(r["lambda"][1]) for r in soups]
    objectives = list(rows[0]["objectives"])
    names = [str(r["name"]) for r in rows if r["kind"] == "expert"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    data = {}
    for o in objectives:
        v = np.array([_mean(r, o) for r in soups])
        data[o] = v.tolist()
        span = v.max() - v.min()
        ax.plot(lambdas, (v - v.min()) / (span if span > 0 else 1.0), "o-", label=o, markersize=3)
    ax.set(xlabel=f"λ ({names[0] if names else 'expert 0'} → {names[-1] if names else 'expert 1'})",
           ylabel="metric (min-max normalised over λ)", title="Fig. 6.4(b): metrics vs λ")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"lambda": lambdas, "metrics": data}


# ----------------------------------------------------------------------------------------------------------
# The conflict: each expert best on its own metric, judged with a paired bootstrap
# ----------------------------------------------------------------------------------------------------------


def corpus_statistic(scores: CorpusScores, metric: str, idx: np.ndarray) -> np.ndarray:
    """The corpus score of `metric` on each resampled set of images.

    Args:
        scores: Per-image scores of one captioner (`CaptionScorer.corpus`).
        metric: A metric of `evals.captioning.METRICS`.
        idx: int [S, N], row s = the image positions of resample s.

    Returns:
        [S]: BLEU-k re-aggregated from the resampled n-gram statistics (corpus BLEU is not a mean), any other
        metric the mean of the resampled per-image scores.
    """
    idx = np.asarray(idx)
    if metric.startswith("bleu"):
        return bleu_from_stats(scores.bleu_stats[idx].sum(axis=1))[:, int(metric[4:]) - 1]
    return np.asarray(scores.per_image[metric])[idx].mean(axis=1)


def paired_difference_stderr(a: CorpusScores, b: CorpusScores, metric: str, idx: np.ndarray) -> float:
    """Standard error of score_a − score_b on `metric` when both captioners are scored on the same images:
    the standard deviation (ddof 1) over the resamples `idx` (int [S, N]) of the difference of the two corpus
    statistics computed on the SAME resampled images.

    Raises:
        SoupsError: the two were scored on different images.
    """
    if list(a.image_ids) != list(b.image_ids):
        raise SoupsError("a paired bootstrap needs both captioners scored on the same images in the same order")
    diff = corpus_statistic(a, metric, idx) - corpus_statistic(b, metric, idx)
    return float(diff.std(ddof=1))


def expert_conflict(results: Mapping[str, CorpusScores], *, samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Is each expert best, among the experts, on its own metric beyond stderr?

    Args:
        results: {expert name (a reward: bleu1, bleu4, rouge, meteor, cider): its scores on the test images}.
        samples: Bootstrap resamples of the images (shared by every pair).
        seed: Seeds the resamples.

    Returns:
        {"criterion", "experts": {name: {"metric", "score", "best_rival", "margin" (own score − the best
        rival's), "paired_stderr", "independent_stderr" (of that margin), "won_paired", "won_independent",
        "rivals": {rival: {"diff", "paired_stderr", "independent_stderr"}}}}, "wins_paired", "wins_independent",
        "n_experts", "markdown"}. An expert wins when its margin over EVERY rival exceeds that difference's stderr.
    """
    names = list(results)
    if len(names) < 2:
        raise SoupsError(f"the conflict needs at least two experts, got {names}")
    unknown = [n for n in names if n not in OWN_METRIC]
    if unknown:
        raise SoupsError(f"experts {unknown} have no own metric; valid: {', '.join(sorted(OWN_METRIC))}")
    n = len(results[names[0]].image_ids)
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    alone = {e: results[e].bootstrap_stderr(samples, seed) for e in names}
    experts: dict[str, Any] = {}
    for e in names:
        metric = OWN_METRIC[e]
        own = float(results[e].scores[metric])
        rivals = {}
        for r in names:
            if r == e:
                continue
            rivals[r] = {"diff": own - float(results[r].scores[metric]),
                         "paired_stderr": paired_difference_stderr(results[e], results[r], metric, idx),
                         "independent_stderr": float(np.hypot(alone[e][metric], alone[r][metric]))}  # fmt: skip
        best = min(rivals, key=lambda r: rivals[r]["diff"])
        experts[e] = {"metric": metric, "score": own, "best_rival": best, "margin": rivals[best]["diff"],
                      "paired_stderr": rivals[best]["paired_stderr"],
                      "independent_stderr": rivals[best]["independent_stderr"],
                      "won_paired": all(v["diff"] > v["paired_stderr"] for v in rivals.values()),
                      "won_independent": all(v["diff"] > v["independent_stderr"] for v in rivals.values()),
                      "rivals": rivals}  # fmt: skip
    lines = ["| expert | own metric | score | best rival | margin ± paired stderr | ± independent stderr | "
             "won (paired) | won (independent) |", "|---|---|---:|---|---:|---:|---|---|"]  # fmt: skip
    for e, v in experts.items():
        lines.append(f"| {e} | {v['metric']} | {v['score']:.3f} | {v['best_rival']} | {v['margin']:+.4f} ± "
                     f"{v['paired_stderr']:.4f} | ± {v['independent_stderr']:.4f} | "
                     f"{'yes' if v['won_paired'] else 'no'} | {'yes' if v['won_independent'] else 'no'} |")
    wins_p = sum(v["won_paired"] for v in experts.values())
    wins_i = sum(v["won_independent"] for v in experts.values())
    return {"criterion": "own-metric margin over every other expert > its stderr (bootstrap over the test images, "
                         f"{samples} resamples; paired: both scored on the same resampled images)",
            "experts": experts, "wins_paired": wins_p, "wins_independent": wins_i, "n_experts": len(names),
            "markdown": "\n".join(lines)}  # fmt: skip


def _evaluator_node(overrides: Sequence[str], split: str) -> dict[str, Any]:
    """The captioning evaluator's config (configs/pareto/evaluator/captioning.yaml) with the `evaluator.*`
    overrides among `overrides` applied."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "pareto" / "evaluator" / "captioning.yaml")
    dots = [o[len("evaluator.") :] for o in overrides if o.startswith("evaluator.")]
    node = OmegaConf.merge(base, OmegaConf.from_dotlist(dots), {"split": split})
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def score_experts(models: Mapping[str, str], overrides: Sequence[str], split: str = "test") -> dict[str, CorpusScores]:
    """Each expert's per-image scores on `split`, captioned as the captioning evaluator of the fronts does."""
    import torch

    from rl.captioning.evaluator import build_captioning_evaluator
    from rl.captioning.models import load_captioner

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = list(models.values())
    evaluator = build_captioning_evaluator(_evaluator_node(overrides, split), experts=paths, device=device)
    out = {}
    try:
        for name, path in models.items():
            evaluator.evaluate(load_captioner(path, device=device).model)
            assert evaluator.last_scores is not None
            out[name] = evaluator.last_scores
    finally:
        evaluator.scorer.close()
    return out


# ----------------------------------------------------------------------------------------------------------
# The quickstart hook
# ----------------------------------------------------------------------------------------------------------


def _pareto(overrides: Sequence[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "soups.pareto", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SoupsError(f"python -m soups.pareto failed ({tail}); see {log}")


def after_front(cfg: Any, out: Path) -> dict[str, Any]:
    """The captioning quickstart's own outputs under `<out>/captioning/`: the uniform-soup table of all experts,
    the pair fronts (validation and test) with HV RS vs MORL, Fig. 6.4(a) and (b).

    Settings: `cfg.captioning` (`pair`: the two experts of the 2-D front, `pair_points`: its λ grid,
    `evaluator`: soups.pareto overrides shared by these fronts).
    """
    node = cfg.captioning
    pair = [str(p) for p in node.pair]
    experts = [str(e) for e in cfg.experts]
    missing = [p for p in pair if p not in experts]
    if missing:
        raise SoupsError(f"captioning.pair={pair}: {missing} not among the experts {experts}")
    target = Path(out) / "captioning"
    target.mkdir(parents=True, exist_ok=True)
    models = {e: str(Path(out) / "experts" / e / "model") for e in experts}
    morl = [{"path": str(Path(out) / "morl" / d.name / "model"), "name": f"MORL {d.name}"}
            for d in sorted((Path(out) / "morl").glob("mu*")) if (d / "model" / "config.json").is_file()]  # fmt: skip
    common = [f"init={Path(out) / 'init'}", "overwrite=true", f"seed={cfg.seed}", "trajectories=[]",
              *[str(o) for o in node.evaluator]]  # fmt: skip
    results: dict[str, Any] = {"pair": pair}

    try:  # ---- the uniform soup of all the experts: in the main front (grid.uniform=true), else evaluated here
        table = uniform_table(read_front(Path(out) / "front"))
    except SoupsError:
        uni = target / "uniform"
        if not (uni / "summary.json").is_file():
            _pareto([f"experts={hydra_list([models[e] for e in experts])}", f"expert_names={hydra_list(experts)}",
                     f"grid.n_points={len(experts)}", "grid.uniform=true", f"output={uni}", *common],
                    target / "uniform.log")  # fmt: skip
        table = uniform_table(read_front(uni))
    conflict = expert_conflict(score_experts(models, [str(o) for o in node.evaluator]))
    (target / "uniform_soup.md").write_text(
        table["markdown"] + "\n\nThe conflict: each expert's own metric against the best other expert (test; "
        f"{conflict['wins_paired']}/{conflict['n_experts']} won beyond the paired stderr, "
        f"{conflict['wins_independent']}/{conflict['n_experts']} beyond the independent one):\n\n"
        + conflict["markdown"] + "\n")  # fmt: skip
    results["uniform"] = {k: v for k, v in table.items() if k != "markdown"}
    results["conflict"] = {k: v for k, v in conflict.items() if k != "markdown"}

    fronts = {}
    for split in ("val", "test"):  # ---- the pair front on validation (to choose λ) and on test (to report)
        front = target / f"pair_{split}"
        if not (front / "summary.json").is_file():
            _pareto([f"experts={hydra_list([models[p] for p in pair])}", f"expert_names={hydra_list(pair)}",
                     f"grid.n_points={int(node.pair_points)}", f"evaluator.split={split}",
                     f"morl={hydra_value(morl)}", f"output={front}", *common],
                    target / f"pair_{split}.log")  # fmt: skip
        fronts[split] = read_front(front)
    results["hypervolume_test"] = pair_hypervolumes(fronts["test"], pair)
    results["fig_6_4a"] = preference_figure(fronts["val"], fronts["test"], pair, target / "fig6_4a_lambda_vs_mu.png")
    results["fig_6_4b"] = metrics_figure(fronts["test"], target / "fig6_4b_metrics_vs_lambda.png")
    write_json(target / "captioning_summary.json", results)
    hv = results["hypervolume_test"]
    print(f"uniform soup of {len(experts)} experts vs init:\n{table['markdown']}")
    print(f"the conflict (own metric vs the best other expert, test): {conflict['wins_paired']}/{len(experts)} won "
          f"beyond the paired stderr, {conflict['wins_independent']}/{len(experts)} beyond the independent "
          f"one:\n{conflict['markdown']}")
    print(f"HV on ({pair[0]}, {pair[1]}), test: rewarded soups {hv['rs']:.4f}"
          + (f" vs MORL {hv['morl']:.4f}" if "morl" in hv else ""))  # fmt: skip
    print(f"figures: {target / 'fig6_4a_lambda_vs_mu.png'}, {target / 'fig6_4b_metrics_vs_lambda.png'}")
    return results
