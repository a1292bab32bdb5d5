"""`python -m soups.pareto`: the rewarded-soups front of N experts against MORL, the init and an ensemble.

    python -m soups.pareto experts=[runs/complete/final,runs/faithful/final] morl=[runs/morl_0.5/final]
    accelerate launch -m soups.pareto experts=[...]          # λ points split across processes

Set-up: the experts (PEFT adapters on one base, or full HF checkpoints of one architecture) are checked for a
common base, then held by ONE `soups.soup.Soup` whose resident model has its weights switched in place for
every λ of the simplex grid — nothing is reloaded per λ. An evaluator, picked by name from
`soups.pareto_registry.EVALUATORS` and built once, scores the model on every objective. The init and the MORL
runs are extra points, each loaded once. The optional functional ensemble (λ-weighted logits of the experts
during decoding, thesis Fig. 6.4(c)) is scored by the evaluator's `evaluate_ensemble`.

Outputs (one atomic directory, resolved config beside):
- `front.jsonl`: one row per point: kind (expert/soup/morl/init/ensemble), name, λ (μ for MORL), every
  objective's mean, stderr and n, the seed.
- `summary.json`: hypervolume of the RS front (experts + soups) and of the MORL front (experts + MORL runs, as
  μ ∈ {0, 1} MORL runs *are* the experts), with the normalisation and reference point used; the non-dominated
  points; the LMC gap table R_k(θ_λ) − Σ_i λ_i R_k(θ_i) (Hypothesis 6.1); EUM.
- `front.png`: the objective plane (2 objectives) or pairwise panels, with training trajectories read from the
  runs' `metrics.jsonl` when given.

The Pareto metrics come from `evals.pareto`; the λ grid from `soups.simplex`; this module only orchestrates.
"""

from __future__ import annotations

from soups.cli import bar_disabled, entry, precheck

precheck(__name__, __file__, "../configs/pareto")  # a bad command line fails here, before the heavy imports

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from soups.front import check_device_and_dtype, grid_divisions, load_base_model, open_soup  # noqa: F401
from soups.pareto_registry import Evaluator, ObjectiveStat, OutputWriter, build_evaluator, check_experts  # noqa: F401
from soups.utils import SoupsError, atomic_dir, save_resolved_config, seed_everything, write_json

KINDS = ("expert", "soup", "morl", "init", "ensemble")

# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------


def vertex_index(lam: Sequence[float]) -> int | None:
    """The index i if `lam` is the vertex e_i of the simplex (within 1e-9), else None."""
    arr = np.asarray(lam, dtype=float)
    hot = np.flatnonzero(np.abs(arr) > 1e-9)
    if len(hot) == 1 and abs(arr[hot[0]] - 1.0) <= 1e-9:
        return int(hot[0])
    return None


def make_row(
    kind: str,
    name: str,
    stats: Mapping[str, ObjectiveStat],
    *,
    lam: Sequence[float] | None,
    seed: int,
    path: str | None = None,
) -> dict[str, Any]:
    """One `front.jsonl` row.

    Args:
        kind: One of `KINDS`.
        name: A short label (expert name, "λ=0.30,0.70", MORL run name...).
        stats: Objective -> (mean, stderr, n).
        lam: λ for soups/experts/ensembles, μ for MORL (if known), None for the init.
        seed: The evaluation seed.
        path: The checkpoint evaluated, if a single one.
    """
    if kind not in KINDS:
        raise SoupsError(f"unknown point kind {kind!r}; valid: {', '.join(KINDS)}")
    return {
        "kind": kind,
        "name": name,
        "lambda": None if lam is None else [round(float(x), 10) for x in lam],
        "objectives": {k: {"mean": float(v[0]), "stderr": float(v[1]), "n": int(v[2])} for k, v in stats.items()},
        "n": min((int(v[2]) for v in stats.values()), default=0),
        "seed": int(seed),
        "path": path,
    }


def means_matrix(rows: Sequence[Mapping[str, Any]], objectives: Sequence[str]) -> np.ndarray:
    """The objective means of `rows` as an array of shape [len(rows), K]."""
    return np.array([[row["objectives"][k]["mean"] for k in objectives] for row in rows], dtype=float).reshape(
        len(rows), len(objectives)
    )


def normalise_front(values: np.ndarray, mode: str, init: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Per-objective normalisation of every evaluated point, with the mapping recorded for the summary.

    Modes (the arithmetic is `evals.pareto`'s):
        - `none`: identity.
        - `init_worst`: the thesis' Fig. 6.4: init → 1, the worst point of `values` → 0, i.e.
          (v − worst) / (init − worst). Needs `init`.
        - `minmax`: worst → 0, best → 1 over `values`; an objective on which every point ties maps to 0 (listed
          in `flat_objectives`) rather than failing, so a degenerate front still gets a summary.

    Args:
        values: Shape [P, K], every point evaluated (all kinds), higher is better.
        mode: `none`, `init_worst` or `minmax`.
        init: Shape [K], the init's means (for `init_worst`).

    Returns:
        (normalised values [P, K], {"mode", "zero": [K], "one": [K]}): the raw values mapped to 0 and to 1.

    Raises:
        SoupsError: unknown mode, `init_worst` without init, or an objective where the init is the worst point.
    """
    from evals.pareto import normalize_init_worst, normalize_minmax

    values = np.asarray(values, dtype=float)
    if mode == "none":
        return values.copy(), {"mode": mode, "zero": [0.0] * values.shape[1], "one": [1.0] * values.shape[1]}
    worst = values.min(axis=0)
    if mode == "init_worst":
        if init is None:
            raise SoupsError("normalise=init_worst needs the init point (set init=...) or use normalise=minmax")
        init = np.asarray(init, dtype=float)
        if (flat := np.flatnonzero(init <= worst)).size:
            raise SoupsError(f"normalise=init_worst: the init is the worst point on objective {int(flat[0])} "
                             f"({init[flat[0]]:.4g}), so init -> 1, worst -> 0 is undefined; use normalise=minmax")
        return normalize_init_worst(values, init, worst), {"mode": mode, "zero": worst.tolist(), "one": init.tolist()}
    if mode == "minmax":
        best = values.max(axis=0)
        flat = best == worst  # every point ties on this objective: map it to 0 (span 1) instead of dividing by 0
        upper = np.where(flat, worst + 1.0, best)
        info = {"mode": mode, "zero": worst.tolist(), "one": upper.tolist(),
                "flat_objectives": np.flatnonzero(flat).tolist()}  # fmt: skip
        return normalize_minmax(values, worst, upper), info
    raise SoupsError(f"unknown normalise={mode!r}; valid: none, init_worst, minmax")


def lmc_table(rows: Sequence[Mapping[str, Any]], objectives: Sequence[str], n_experts: int) -> dict[str, Any]:
    """The LMC gaps R_k(θ_λ) − Σ_i λ_i R_k(θ_i) of every soup row (Hypothesis 6.1 holds where all are ≥ 0).

    Args:
        rows: `front.jsonl` rows; needs the N expert rows (λ = e_i) and the soup rows.
        objectives: The K objective names.
        n_experts: N.

    Returns:
        {"rows": [{"lambda", "gap": {obj: g}, "stderr": {obj: s}}...], "min_gap": {obj}, "mean_gap": {obj},
        "fraction_nonnegative": f, "fraction_within_2se": f (gaps ≥ −2 stderr: not significantly below the line),
        "holds": bool}. `stderr` is the gap's standard error assuming independent estimates,
        sqrt(se_λ² + Σ λ_i² se_i²) (conservative: every λ is scored on the same prompts).
    """
    from evals.pareto import lmc_gaps

    experts: dict[int, Mapping[str, Any]] = {}
    for row in rows:
        if row["kind"] == "expert" and row["lambda"] is not None and (i := vertex_index(row["lambda"])) is not None:
            experts[i] = row
    if sorted(experts) != list(range(n_experts)):
        raise SoupsError(f"LMC gaps need all {n_experts} expert vertices; found {sorted(experts)}")
    soups = [row for row in rows if row["kind"] == "soup"]
    if not soups:
        return {"rows": [], "min_gap": {}, "mean_gap": {}, "fraction_nonnegative": None, "fraction_within_2se": None,
                "holds": None}  # fmt: skip
    lambdas = np.array([row["lambda"] for row in soups], dtype=float)  # [P, N]
    expert_vals = means_matrix([experts[i] for i in range(n_experts)], objectives)  # [N, K]
    soup_vals = means_matrix(soups, objectives)  # [P, K]
    gaps = np.asarray(lmc_gaps(lambdas, soup_vals, expert_vals), dtype=float)  # [P, K]
    expert_se = np.array([[experts[i]["objectives"][k]["stderr"] for k in objectives] for i in range(n_experts)])
    soup_se = np.array([[row["objectives"][k]["stderr"] for k in objectives] for row in soups])
    gap_se = np.sqrt(soup_se**2 + (lambdas**2) @ (expert_se**2))
    table = [
        {
            "lambda": row["lambda"],
            "gap": dict(zip(objectives, gaps[p].tolist())),
            "stderr": dict(zip(objectives, gap_se[p].tolist())),
        }
        for p, row in enumerate(soups)
    ]
    return {
        "rows": table,
        "min_gap": dict(zip(objectives, gaps.min(axis=0).tolist())),
        "mean_gap": dict(zip(objectives, gaps.mean(axis=0).tolist())),
        "fraction_nonnegative": float((gaps >= 0).mean()),
        "fraction_within_2se": float((gaps >= -2 * gap_se).mean()),
        "holds": bool((gaps >= 0).all()),
    }


def summarise(
    rows: Sequence[Mapping[str, Any]],
    objectives: Sequence[str],
    *,
    n_experts: int,
    normalise: str,
    reference: Sequence[float] | None,
    eum_points: int,
) -> dict[str, Any]:
    """Hypervolumes, non-dominated points, LMC gaps and EUM of a front.

    The RS front is experts + soups; the MORL front experts + MORL runs (μ = e_i MORL runs are the experts, as
    in the thesis' figures); the ensemble front experts + ensembles. All are normalised the same way, over every
    point evaluated, and measured against one reference point (default: the origin of the normalised space,
    i.e. the worst value of every objective for `init_worst`/`minmax`).

    Args:
        rows: `front.jsonl` rows.
        objectives: The K objective names.
        n_experts: N.
        normalise: See `normalise_front`.
        reference: Shape [K] in normalised units, or None for the default.
        eum_points: Divisions of the simplex of utility weights for EUM (k of `simplex_grid`).
    """
    from evals.pareto import expected_utility, hypervolume, non_dominated_indices, sparsity

    values = means_matrix(rows, objectives)
    init_rows = [row for row in rows if row["kind"] == "init"]
    init = means_matrix(init_rows, objectives)[0] if init_rows else None
    normed, norm_info = normalise_front(values, normalise, init)
    if reference is None:
        ref = np.zeros(len(objectives)) if normalise != "none" else values.min(axis=0)
    else:
        ref = np.asarray(list(reference), dtype=float)
        if ref.shape != (len(objectives),):
            raise SoupsError(f"reference={list(reference)} has {ref.size} values for {len(objectives)} objectives")
    kinds = np.array([row["kind"] for row in rows])
    fronts: dict[str, Any] = {}
    front_members = {"rs": ("expert", "soup"), "morl": ("expert", "morl"), "ensemble": ("expert", "ensemble")}
    for front_name, members in front_members.items():
        if front_name != "rs" and not (kinds == members[1]).any():
            continue
        mask = np.isin(kinds, members)
        pts = normed[mask]
        idx = np.flatnonzero(mask)[non_dominated_indices(pts)].tolist()
        fronts[front_name] = {
            "hypervolume": float(hypervolume(pts, ref)),
            "eum": float(expected_utility(pts, k=eum_points)),
            "sparsity": float(sparsity(pts[non_dominated_indices(pts)])),
            "n_points": int(mask.sum()),
            "non_dominated": [
                {"kind": rows[i]["kind"], "name": rows[i]["name"], "lambda": rows[i]["lambda"],
                 "normalised": dict(zip(objectives, normed[i].tolist()))}
                for i in idx
            ],
        }
    return {
        "objectives": list(objectives),
        "normalisation": norm_info,
        "reference_point": ref.tolist(),
        "hypervolume": {name: front["hypervolume"] for name, front in fronts.items()},
        "eum": {name: front["eum"] for name, front in fronts.items()},
        "fronts": fronts,
        "lmc": lmc_table(rows, objectives, n_experts),
    }


def read_trajectory(run_dir: str | Path, objectives: Sequence[str], keys: Sequence[str]) -> np.ndarray:
    """A training run's path in objective space, from its `metrics.jsonl` (one JSON object per step).

    Args:
        run_dir: The run directory (or its `metrics.jsonl`, or a checkpoint dir whose parent holds it).
        objectives: The K objective names.
        keys: Templates tried in order for each objective's column, e.g. "reward/{objective}".

    Returns:
        Shape [T, K]: one row per logged step that has every objective.

    Raises:
        SoupsError: no metrics.jsonl, or no step that logs every objective.
    """
    path = Path(run_dir)
    candidates = [path] if path.is_file() else [path / "metrics.jsonl", path.parent / "metrics.jsonl"]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise SoupsError(f"no metrics.jsonl for trajectory {run_dir} (looked at {', '.join(map(str, candidates))})")
    points = []
    for line in file.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        point = []
        for objective in objectives:
            names = [t.format(objective=objective) for t in keys]
            value = next((record[name] for name in names if name in record), None)
            if value is None:
                break
            point.append(float(value))
        if len(point) == len(objectives):
            points.append(point)
    if not points:
        tried = ", ".join(t.format(objective=objectives[0]) for t in keys)
        raise SoupsError(f"{file}: no step logs every objective (tried keys like {tried})")
    return np.array(points, dtype=float)


# ---------------------------------------------------------------------------------------------------------------
# Loading the experts
# ---------------------------------------------------------------------------------------------------------------


def _evaluate_checkpoint(
    path: str, evaluator: Evaluator, *, base_model: str | None, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, ObjectiveStat]:
    """Loads one checkpoint (an adapter or a full model) once, scores it, frees it."""
    soup = open_soup([path], base_model=base_model, device=device, dtype=dtype)
    soup.set_weights([1.0])
    seed_everything(seed)
    stats = evaluator.evaluate(soup.model)
    del soup
    return stats


def _name_of(path: str) -> str:
    """A short label for a checkpoint path: its directory name, or its parent's when that is generic."""
    p = Path(path)
    generic = {"final", "adapter", "checkpoint", "model", "last", "best"}
    return f"{p.parent.name}" if p.name in generic or p.name.startswith("checkpoint") else p.name


def _points(cfg: DictConfig, key: str) -> list[dict[str, Any]]:
    """`morl`/`init` entries as {"path", "name", "mu"}: a path string, or a mapping with path/name/mu."""
    raw = cfg.get(key)
    if raw is None:
        return []
    raw = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        entry = {"path": item} if isinstance(item, str) else dict(item)
        if "path" not in entry:
            raise SoupsError(f"{key} entry {item} has no path")
        entry.setdefault("name", _name_of(entry["path"]))
        entry.setdefault("mu", None)
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def run_front(cfg: DictConfig) -> Path:
    """Generates the front described by `cfg` (see configs/pareto/config.yaml) and returns the output dir."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from soups.plots import plot_front
    from soups.simplex import simplex_grid

    # ---- set-up ------------------------------------------------------------------------------------------------
    # cpu=True lets accelerate form a gloo group of CPU processes (torchrun on a machine without CUDA)
    dtype = check_device_and_dtype(str(cfg.device), cfg.dtype)
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    output = Path(cfg.output).absolute()
    if output.exists() and not cfg.overwrite:
        raise SoupsError(f"output {output} already exists; pass overwrite=true to replace it")
    if OmegaConf.is_missing(cfg, "experts"):
        raise SoupsError("no experts given: set experts=[path1,path2,...] (PEFT adapters or HF checkpoints)")
    experts = [str(p) for p in cfg.experts]
    if len(experts) < 2:
        raise SoupsError(f"a front needs at least 2 experts, got {len(experts)}: {experts}")
    info = check_experts(experts)
    k = grid_divisions(len(experts), cfg.grid.n_points, cfg.grid.step)
    lambdas = torch.as_tensor(simplex_grid(len(experts), k), dtype=torch.float64)  # [P, N]
    if cfg.grid.dirichlet > 0:
        from soups.simplex import dirichlet_samples

        extra = torch.as_tensor(dirichlet_samples(len(experts), cfg.grid.dirichlet, seed=cfg.seed), dtype=torch.float64)
        lambdas = torch.cat([lambdas, extra])
    if cfg.grid.get("uniform", False):  # the uniform soup 1/N (with n_points=N: the uniform-soup table)
        uniform = torch.full((1, len(experts)), 1.0 / len(experts), dtype=torch.float64)
        if not bool(torch.isclose(lambdas, uniform).all(dim=1).any()):
            lambdas = torch.cat([lambdas, uniform])
    evaluator = build_evaluator(cfg.evaluator, experts=experts, device=device)
    batch_lambdas = int(cfg.grid.batch_lambdas)
    if batch_lambdas < 1:
        raise SoupsError(f"grid.batch_lambdas={batch_lambdas} must be ≥ 1 (1 = one λ per pass)")
    if batch_lambdas > 1 and not hasattr(evaluator, "evaluate_batched"):
        raise SoupsError(f"grid.batch_lambdas={batch_lambdas}: evaluator {cfg.evaluator.name!r} cannot score several "
                         "λ per pass; set grid.batch_lambdas=1")
    objectives = list(evaluator.objectives)
    writer = evaluator if isinstance(evaluator, OutputWriter) else None  # the task's own files (e.g. images)
    expert_names = [str(n) for n in cfg.expert_names] if cfg.expert_names else [_name_of(p) for p in experts]
    if len(expert_names) != len(experts):
        raise SoupsError(f"expert_names has {len(expert_names)} names for {len(experts)} experts")
    trajectories = {  # read now: a missing metrics.jsonl fails before the evaluation, not after it
        _name_of(str(run)): read_trajectory(run, objectives, list(cfg.trajectory_keys)) for run in cfg.trajectories
    }
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    main = state.is_local_main_process  # bars on one process only (and, by tqdm, only on a terminal)

    # ---- extra points: init and MORL runs, each loaded once (before the soup: one model in memory at a time) ----
    extras = [("init", e) for e in _points(cfg, "init")] + [("morl", e) for e in _points(cfg, "morl")]
    rows_local: list[tuple[int, dict[str, Any]]] = []
    outputs_local: list[tuple[int, Any]] = []  # writer.last_outputs() of each row scored by `evaluate`
    with state.split_between_processes(list(enumerate(extras))) as mine:
        for idx, (kind, entry) in tqdm(mine, desc="init/MORL", disable=bar_disabled(bool(mine) and main)):
            stats = _evaluate_checkpoint(entry["path"], evaluator, base_model=cfg.base_model or info["base"],
                                         device=device, dtype=dtype, seed=cfg.seed)
            rows_local.append((idx, make_row(kind, entry["name"], stats, lam=entry["mu"], seed=cfg.seed,
                                             path=entry["path"])))
            if writer is not None:
                outputs_local.append((idx, writer.last_outputs()))

    # ---- λ sweep: one resident model, weights switched in place (or K λ per batched forward, LoRA) ------------
    soup = open_soup(experts, base_model=cfg.base_model, device=device, dtype=dtype)
    batched = batch_lambdas > 1 and soup.batchable
    if batch_lambdas > 1 and not batched and main:
        print(f"grid.batch_lambdas={batch_lambdas}: these experts switch weights in place (full checkpoints or "
              "modules_to_save), one λ per pass")
    offset = len(extras)
    with state.split_between_processes(list(enumerate(lambdas.tolist()))) as mine:
        chunks = [mine[i : i + batch_lambdas] for i in range(0, len(mine), batch_lambdas)] if batched else \
            [[item] for item in mine]
        for chunk in tqdm(chunks, desc="λ sweep", disable=bar_disabled(main)):
            seed_everything(cfg.seed)  # common random numbers: every λ sees the same prompts and sampling noise
            if batched:
                with soup.batched([lam for _, lam in chunk]) as batch:
                    stats_list = evaluator.evaluate_batched(batch)  # type: ignore[attr-defined]
            else:
                soup.set_weights(chunk[0][1])
                stats_list = [evaluator.evaluate(soup.model)]
                if writer is not None:
                    outputs_local.append((offset + chunk[0][0], writer.last_outputs()))
            for (idx, lam), stats in zip(chunk, stats_list):
                vertex = vertex_index(lam)
                kind, name = ("expert", expert_names[vertex]) if vertex is not None else ("soup", _lambda_name(lam))
                rows_local.append((offset + idx, make_row(kind, name, stats, lam=lam, seed=cfg.seed)))
    del soup

    # ---- optional functional ensemble (λ-weighted logits) on the interior λ points -------------------------------
    offset += len(lambdas)
    if cfg.ensemble.enabled:
        if not hasattr(evaluator, "evaluate_ensemble"):
            raise SoupsError(f"evaluator {cfg.evaluator.name!r} has no functional-ensemble baseline; set "
                             "ensemble.enabled=false")
        interior = [lam for lam in lambdas.tolist() if vertex_index(lam) is None]
        if cfg.ensemble.every > 1:
            interior = interior[:: cfg.ensemble.every]
        with state.split_between_processes(list(enumerate(interior))) as mine:
            for idx, lam in tqdm(mine, desc="ensemble", disable=bar_disabled(bool(mine) and main)):
                seed_everything(cfg.seed)
                stats = evaluator.evaluate_ensemble(lam)
                rows_local.append((offset + idx, make_row("ensemble", _lambda_name(lam), stats, lam=lam,
                                                          seed=cfg.seed)))
    seconds = time.perf_counter() - t0

    # ---- gather on rank 0 and save ---------------------------------------------------------------------------
    gathered = gather_object(rows_local) if state.num_processes > 1 else rows_local
    if writer is not None and state.num_processes > 1:
        outputs_local = gather_object(outputs_local)
    if not state.is_main_process:
        return output
    ordered = sorted(gathered, key=lambda item: item[0])
    rows = [row for _, row in ordered]
    summary = summarise(rows, objectives, n_experts=len(experts), normalise=cfg.normalise,
                        reference=cfg.reference, eum_points=cfg.eum_divisions)
    summary.update({"experts": experts, "expert_kind": info["kind"], "base": info["base"],
                    "grid_divisions": k, "batch_lambdas": batch_lambdas, "n_points": len(rows),
                    "seconds": round(seconds, 3), "processes": state.num_processes, "seed": cfg.seed})
    with atomic_dir(output, overwrite=cfg.overwrite) as tmp:
        (tmp / "front.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        write_json(tmp / "summary.json", summary)
        plot_front(rows, objectives, tmp / "front.png", trajectories=trajectories, title=cfg.title)
        if writer is not None:
            outputs = dict(outputs_local)
            writer.write_outputs(tmp, rows, [outputs.get(idx) for idx, _ in ordered])
        save_resolved_config(cfg, tmp)
    _print_summary(output, summary)
    return output


def _lambda_name(lam: Sequence[float]) -> str:
    return "λ=" + ",".join(f"{x:.2f}" for x in lam)


def _print_summary(output: Path, summary: Mapping[str, Any]) -> None:
    hv = ", ".join(f"{name} {value:.4f}" for name, value in summary["hypervolume"].items())
    lmc = summary["lmc"]
    print(f"front: {summary['n_points']} points in {summary['seconds']:.1f}s -> {output}")
    print(f"hypervolume ({summary['normalisation']['mode']}, ref {summary['reference_point']}): {hv}")
    if lmc["rows"]:
        print(f"LMC gaps: min {lmc['min_gap']}, {100 * lmc['fraction_nonnegative']:.0f}% ≥ 0")


@entry("../configs/pareto")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m soups.pareto experts=[A,B] ...`."""
    run_front(cfg)


if __name__ == "__main__":
    main()
