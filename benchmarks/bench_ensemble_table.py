"""The diverse-ensembles table: every method at M = 4 on RotatedDigits, offline on CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_ensemble_table.py --out runs/ensemble_table
    OMP_NUM_THREADS=1 python benchmarks/bench_ensemble_table.py --lambda-sweep --out runs/ensemble_lambda  # vs λ

Each row is `vision/train_ensemble.py experiment=bench method=<name>` (one process, imports paid once):
RotatedDigits 0°/15°/30° train (their 20 % out splits are the ID test set), 60° is the shifted domain,
and TransformedDigits noise + invert digits are the OOD set. Columns come from `evals.ensemble` with averaged
probabilities: accuracy, NLL, ECE (15 bins), Brier, OOD AUROC and FPR95 with the MSP score (OOD positive),
prediction disagreement (share of member pairs whose argmax differ) and #unique (distinct member predictions
per sample), inference parameters and the forward time of one ID test batch (min(512, 268) images).
Rows "… (soup)" are the uniform weight soup of the heads where the members share a backbone; methods whose
soup is meaningless say why in metrics.json. A second table compares the ways of combining the members
(averaged probabilities / logits, majority vote, soup). Writes `<out>/table.md` and `<out>/<row>/metrics.json`.

The λ sweep trains each diversity method at several λ > 0 (λ = 0 is the one deep run, shared) and reports, besides
the common diversity metrics, the method's own diversity term evaluated on the ID test set (`own_term`).
`--reuse` rebuilds a table from finished runs.

    OMP_NUM_THREADS=1 python benchmarks/bench_ensemble_table.py --retime --out runs/ensemble_table  # fwd ms only

`--retime` re-measures the `fwd ms` column without training, for a quiet machine: every finished row (and its
soup) is rebuilt from its `config.yaml` and `model.safetensors` (`vision.train_ensemble.load_run`), checked to
reproduce its stored ID accuracy, NLL and parameter count, then timed with the same `forward_ms` on the same
batch, round-robin over `--rounds` rounds (each round starts one row later) so that drift hits every row alike;
the column is the median over rounds. Writes `<out>/retime.json` and `<out>/table.md` with the new column; the
rows' `metrics.json` are left as trained.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from evals.ensemble import evaluate_ensemble
from soups.utils import SoupsError, atomic_write_text, steady_malloc, write_json
from vision.ensembles import losses as L
from vision.train_ensemble import (
    forward_batch,
    forward_ms,
    id_test_set,
    inference_parameters,
    load_run,
    member_logits,
    run,
)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs" / "train_ensemble")

# row name -> overrides
ROWS: dict[str, list[str]] = {
    "deep": ["method=deep"],
    "shallow": ["method=shallow"],
    "packed": ["method=packed"],
    "mixmo": ["method=mixmo"],
    "dice": ["method=dice"],
    "sed": ["method=sed"],
    "sed_partial": ["method=sed", "method.frozen_backbone=true", "method.head_layers=2", "method.head_init=shared"],
    "sdde": ["method=sdde"],
    "gncl": ["method=gncl"],
    "ncl": ["method=ncl"],
    "balanced": ["method=balanced"],
    "attribution": ["method=attribution"],
    "fishr": ["method=fishr"],
}

# method -> λ values of the sweep; λ = 0 is the same run for all of them (the deep ensemble, same seed: the
# loss is then exactly the deep-ensemble loss, tests/vision/test_ensemble_methods.py), so it is run once.
SWEEP: dict[str, list[float]] = {
    "sed": [0.5, 2.0],
    "sdde": [0.5, 2.0],
    "gncl": [0.5, 1.0, 2.0, 4.0],  # λ = M = 4: the members' second-order loss is the ensemble's (diverges here)
    "ncl": [1.0, 4.0, 16.0, 64.0],  # its bounded penalty is small: λ ≤ 4 barely moves it
    "balanced": [0.5, 1.0],
    "attribution": [1.0, 4.0],  # the normalised attribution term lies in [0, 1] (vision.ensembles.losses)
}


# method -> (its own diversity term, which way is more diverse)
OWN_TERM: dict[str, tuple[str, str]] = {
    "sed": ("α-weighted A2D, all pairs", "↓"),
    "sdde": ("Grad-CAM cosine", "↓"),
    "gncl": ("GNCL penalty", "↑"),
    "ncl": ("NCL penalty (probs)", "↑"),
    "balanced": ("none (CE of the mean logit)", ""),
    "attribution": ("attribution variance", "↑"),
}


def run_row(overrides: list[str], out: Path, extra: list[str], reuse: bool = False) -> dict[str, Any]:
    """Composes the train_ensemble config with `experiment=bench` + overrides and runs it into `out`
    (with `reuse`, an existing `out/metrics.json` is read instead)."""
    if reuse and (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=bench", *overrides, f"output={out}", "overwrite=true", *extra])
    return run(cfg)


def own_term(run_dir: Path, method: str) -> float:
    """`method`'s own diversity term on the ID test set for the trained member ensemble saved in `run_dir`.

    The weights of any member-ensemble run (the deep λ = 0 run included) are loaded into a `MemberEnsemble`
    (eval mode, BatchNorm statistics fixed) whose diversity term is switched to `method`: SED over all pairs
    (not the training step's random pair), GNCL / NCL penalties, SDDE's Grad-CAM cosine, the attribution
    variance. NaN for `balanced`, whose extra term is a CE, not a diversity.
    """
    if method not in ("sed", "gncl", "ncl", "sdde", "attribution"):
        return float("nan")
    _, model, splits = load_run(run_dir)
    id_test = id_test_set(splits)
    pairs = [id_test[j] for j in range(len(id_test))]
    x = torch.stack([p[0] for p in pairs])
    y = torch.as_tensor([int(p[1]) for p in pairs])
    model.diversity, model.lam = method, 1.0
    with torch.enable_grad():
        if method in ("sdde", "attribution"):
            return model.training_loss([(x, y)], 1, 1)[1]["diversity"]
        logits = model(x).detach()
    if method == "sed":
        return float(L.sed_diversity(logits, y))
    return float(L.gncl_penalty(logits, "ce") if method == "gncl" else L.ncl_penalty(logits))


def _check_reload(label: str, logits: torch.Tensor, labels: torch.Tensor, stored: dict[str, Any]) -> dict[str, float]:
    """Accuracy / NLL of the reloaded model's averaged probabilities against the stored ones.

    Raises:
        SoupsError: they differ (accuracy by any sample, NLL by more than 1e-4): the weights were not reloaded.
    """
    e = evaluate_ensemble(logits, labels, None, combine="probs")
    if abs(e["accuracy"] - stored["accuracy"]) > 1e-9 or abs(e["nll"] - stored["nll"]) > 1e-4:
        raise SoupsError(f"{label}: reloaded model gives acc {e['accuracy']:.4f} nll {e['nll']:.5f}, metrics.json "
                         f"says acc {stored['accuracy']:.4f} nll {stored['nll']:.5f}: wrong load")
    return {"accuracy": e["accuracy"], "nll": e["nll"], "stored_nll": stored["nll"]}


def retime(out: Path, rows: list[str], rounds: int) -> dict[str, Any]:
    """Re-measures `forward_ms` of every finished row in `out` (and of its soup), without training.

    Each row is rebuilt by `load_run`, checked against its `metrics.json` (ID accuracy and NLL of p̄, the soup's
    too, parameters, batch size), then all models are timed round-robin: `rounds` rounds, each calling
    `forward_ms` (1 warm-up + median of 5 forwards) once per model, the start rotating by one row per round.

    Returns:
        `{"forward_ms": {label: median over rounds}, "rounds": {label: [per-round ms]}, "checks": ..., ...}`.
    """
    malloc_pinned = steady_malloc()
    models: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
    checks: dict[str, Any] = {}
    for name in rows:
        stored = json.loads((out / name / "metrics.json").read_text())
        cfg, model, splits = load_run(out / name)
        bs = int(cfg.eval_batch_size)
        id_test = id_test_set(splits)
        cpu = torch.device("cpu")
        logits, labels = member_logits(model, id_test, cpu, bs)
        checks[name] = _check_reload(name, logits, labels, stored["ensemble"])
        params = inference_parameters(model)
        x = forward_batch(id_test, bs)
        if params != stored["parameters"] or x.shape[0] != stored["forward_batch"]:
            raise SoupsError(f"{name}: reloaded model has {params} parameters and a {x.shape[0]}-image batch, "
                             f"metrics.json says {stored['parameters']} and {stored['forward_batch']}")
        models.append((name, model, x))
        if "accuracy" in stored["soup"]:
            soup = model.soup()
            s_logits, _ = member_logits(soup, id_test, cpu, bs)
            checks[f"{name} (soup)"] = _check_reload(f"{name} (soup)", s_logits, labels, stored["soup"])
            models.append((f"{name} (soup)", soup, x))
        print(f"reloaded {name}: acc {checks[name]['accuracy']:.4f} = metrics.json", file=sys.stderr)
    times: dict[str, list[float]] = {label: [] for label, _, _ in models}
    for r in range(rounds):
        for label, model, x in models[r % len(models):] + models[:r % len(models)]:
            times[label].append(forward_ms(model, x))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return {"forward_ms": {k: statistics.median(v) for k, v in times.items()}, "rounds": times, "checks": checks,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "steady_malloc": malloc_pinned,
            "command": " ".join(sys.argv)}


def table_row(name: str, m: dict[str, Any]) -> str:
    e = m["ensemble"]
    return (f"| {name} | {e['accuracy']:.3f} | {e['nll']:.3f} | {e['ece']:.3f} | {e['brier']:.3f} | "
            f"{e['ood/msp/auroc']:.3f} | {e['ood/msp/fpr95']:.3f} | {e.get('prediction_disagreement', 0):.3f} | "
            f"{e.get('num_unique', 1):.3f} | {m.get('shifted_accuracy', float('nan')):.3f} | "
            f"{m['parameters']:,} | {m['forward_ms']:.1f} |")


def soup_row(name: str, m: dict[str, Any]) -> str:
    s = m["soup"]
    return (f"| {name} (soup) | {s['accuracy']:.3f} | {s['nll']:.3f} | {s['ece']:.3f} | {s['brier']:.3f} | "
            f"{s['ood/msp/auroc']:.3f} | {s['ood/msp/fpr95']:.3f} | – | 1 | – | {s['parameters']:,} | "
            f"{s['forward_ms']:.1f} |")


def combine_row(name: str, m: dict[str, Any]) -> str:
    e, lg, s = m["ensemble"], m["ensemble_logit_average"], m["soup"]
    soup = f"{s['accuracy']:.3f} / {s['nll']:.3f}" if "accuracy" in s else "skipped"
    return (f"| {name} | {e['member_accuracy_mean']:.3f} | {e['accuracy']:.3f} / {e['nll']:.3f} | "
            f"{lg['accuracy']:.3f} / {lg['nll']:.3f} | {m['vote_accuracy']:.3f} | {soup} |")


HEADER = ("| method | acc | NLL | ECE | Brier | OOD AUROC | FPR95 | disagr. | #unique | 60° acc | params | fwd ms |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ensemble_table", help="output directory")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help=f"rows to run (default all: {list(ROWS)})")
    parser.add_argument("--lambda-sweep", action="store_true", help="diversity vs λ instead of the method table")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run (steps=...)")
    parser.add_argument("--reuse", action="store_true", help="read finished runs' metrics.json instead of rerunning")
    parser.add_argument("--retime", action="store_true",
                        help="re-measure only the fwd ms column of finished runs (reloaded and checked, no training)")
    parser.add_argument("--rounds", type=int, default=41, help="--retime: round-robin rounds (median reported)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    lines = []
    timed: dict[str, float] = {}
    if args.retime:
        if args.lambda_sweep:
            raise SoupsError("--retime re-measures the method table; drop --lambda-sweep")
        result = retime(out, args.rows, args.rounds)
        write_json(out / "retime.json", result)
        timed, args.reuse = result["forward_ms"], True
    if args.lambda_sweep:
        lines += ["| method | λ | acc | member acc | NLL | disagr. | #unique | OOD AUROC | own term (test) | term |",
                  "|" + " --- |" * 10]
        deep = out / "deep_lam0.0"
        run_row(["method=deep", "method.lam=0.0"], deep, args.override, args.reuse)
        for method, lams in SWEEP.items():
            for lam in [0.0, *lams]:  # λ = 0: the deep run (the loss is then exactly the deep-ensemble loss)
                row = deep if lam == 0 else out / f"{method}_lam{lam}"
                m = run_row([f"method={method}", f"method.lam={lam}"], row, args.override, args.reuse)
                e = m["ensemble"]
                name, way = OWN_TERM[method]
                lines.append(f"| {method} | {lam:g}{' (deep)' if lam == 0 else ''} | {e['accuracy']:.3f} | "
                             f"{e['member_accuracy_mean']:.3f} | {e['nll']:.3f} | {e['prediction_disagreement']:.3f} | "
                             f"{e['num_unique']:.3f} | {e['ood/msp/auroc']:.3f} | {own_term(row, method):.4f} | "
                             f"{name} {way} |")
                print(lines[-1], file=sys.stderr)
    else:
        lines.append(HEADER)
        combined = ["", "| method | mean member acc | avg probs acc / NLL | avg logits acc / NLL | majority vote acc | "
                    "uniform weight soup acc / NLL |", "|" + " --- |" * 6]
        for name in args.rows:
            m = run_row(ROWS[name], out / name, args.override, args.reuse)
            if timed:  # --retime: the re-measured column replaces the stored one in the table only
                m["forward_ms"] = timed[name]
                if "accuracy" in m["soup"]:
                    m["soup"]["forward_ms"] = timed[f"{name} (soup)"]
            lines.append(table_row(name, m))
            print(lines[-1], file=sys.stderr)
            if "accuracy" in m["soup"]:
                lines.append(soup_row(name, m))
                print(lines[-1], file=sys.stderr)
            combined.append(combine_row(name, m))
        lines += combined
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / ("lambda.md" if args.lambda_sweep else "table.md"), text)
    print(text)


if __name__ == "__main__":
    main()
