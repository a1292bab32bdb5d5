"""DiWA averaging on a tiny sweep (greedy cost counted, LMC end points, BN handling) and the tables."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from soups.utils import SoupsError
from vision.average import Context, average_group, ensemble_accuracy, lmc_curve, load_runs, recompute_bn
from vision.collect import accuracy_table, collect, diversity_table, mean_std
from vision.models import Classifier


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-run DiWA sweep on RotatedDigits (tiny MLP, a few steps, LP head)."""
    from vision_testlib import sweep_cfg

    from vision.sweep import run_sweep

    return run_sweep(sweep_cfg(tmp_path_factory.mktemp("avg") / "sweep", n_hparams=3))


def test_greedy_costs_one_evaluation_per_candidate(tiny_sweep: Path) -> None:
    runs = load_runs(tiny_sweep)
    assert len(runs) == 3 and {r.group for r in runs} == {"diwa"}
    ctx = Context(runs[0].cfg, torch.device("cpu"))
    result = average_group(ctx, runs, {"accept": ">="})
    assert result["greedy_evaluations"] == 3 and ctx.evaluations == 3  # M = 3 candidates, 3 val evaluations
    assert 1 <= result["greedy_members"] <= 3 and result["n_members"] == 3
    assert result["erm"] == max(runs, key=lambda r: r.val_acc).test_acc
    assert result["member_mean"] == pytest.approx(sum(r.test_acc for r in runs) / 3)
    assert result["wa_gain"] == pytest.approx(result["uniform"] - result["member_mean"])
    strict = average_group(ctx, runs, {"accept": ">"})
    assert strict["greedy_evaluations"] == 3 and strict["greedy_members"] <= result["greedy_members"]


def test_lmc_curve_end_points_are_the_members(tiny_sweep: Path) -> None:
    runs = load_runs(tiny_sweep)
    ctx = Context(runs[0].cfg, torch.device("cpu"))
    curve = lmc_curve(ctx, runs[0], runs[1], points=3)
    assert [p["lambda"] for p in curve] == [0.0, 0.5, 1.0]
    assert curve[0]["test_acc"] == pytest.approx(ctx.test_acc(runs[0].loader()()))
    assert curve[2]["test_acc"] == pytest.approx(ctx.test_acc(runs[1].loader()()))
    assert curve[0]["test_acc"] == pytest.approx(runs[0].test_acc)  # same number as train.py's summary
    from soups.selection import uniform_soup

    midpoint = uniform_soup([runs[0].loader(), runs[1].loader()], progress=False)  # (θ_a + θ_b) / 2
    assert curve[1]["test_acc"] == pytest.approx(ctx.test_acc(midpoint))


def test_collect_writes_tables_and_plots(tiny_sweep: Path) -> None:
    from vision.average import average_sweep

    average_sweep(tiny_sweep, {"n_pairs": 2, "lmc_points": 2, "device": "cpu"})
    tables = collect(tiny_sweep)
    for name in ("accuracy.md", "accuracy.csv", "diversity.md", "diversity.csv", "diversity_gain.png", "lmc.png"):
        assert (tables / name).is_file(), name
    assert "| 75deg | Avg |" in (tables / "accuracy.md").read_text()


def test_ensemble_accuracy_hand_worked() -> None:
    # 2 members, 3 samples, 2 classes. Mean logits: s0 [1, 0] -> 0; s1 [0.5, 1.5] -> 1; s2 [1, 1.5] -> 1.
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [2.0, 0.0]],
                           [[0.0, 0.0], [1.0, 2.0], [0.0, 3.0]]])
    labels = torch.tensor([0, 1, 0])
    assert ensemble_accuracy(logits, labels) == pytest.approx(2 / 3)  # s0, s1 right; s2 wrong


class _BNOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.num_features = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def test_recompute_bn_matches_data_statistics() -> None:
    # x = [[1, 2], [3, 4]]: mean [2, 3]; unbiased variance ((1)^2 + (1)^2) / 1 = 2 per feature.
    model = Classifier(_BNOnly(), num_classes=2, freeze_bn=True)
    data = torch.utils.data.TensorDataset(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 1]))
    recompute_bn(model, data, torch.device("cpu"), batch_size=2)
    assert torch.allclose(model.featurizer.bn.running_mean, torch.tensor([2.0, 3.0]))
    assert torch.allclose(model.featurizer.bn.running_var, torch.tensor([2.0, 2.0]))
    assert model.freeze_bn and not model.training  # restored


def test_mean_std_and_tables_hand_worked() -> None:
    m, s = mean_std([0.8, 0.9])
    assert m == pytest.approx(0.85) and s == pytest.approx(0.05)  # deviations ±0.05
    assert all(math.isnan(v) for v in mean_std([]))
    rows = [
        {"group": "diwa", "test_envs": [0], "trial": 0, "erm": 0.7, "uniform": 0.8, "ratio_error": 1.0, "wa_gain": 0.1},
        {"group": "diwa", "test_envs": [0], "trial": 1, "erm": 0.7, "uniform": 0.9, "ratio_error": 3.0, "wa_gain": 0.2},
        {"group": "diwa", "test_envs": [1], "trial": 0, "erm": 0.5, "uniform": 0.6},
        {"group": "diwa", "test_envs": [1], "trial": 1, "erm": 0.5, "uniform": 0.5},
    ]
    header, body = accuracy_table(rows, ["A", "B"])
    assert header == ["group", "method", "A", "B", "Avg"]
    uniform = next(r for r in body if r[1] == "uniform")
    # A: (80, 90) -> 85.0 ± 5.0; B: (60, 50) -> 55.0 ± 5.0; Avg per trial (70, 70) -> 70.0 ± 0.0
    assert uniform[2:] == ["85.0 ± 5.0", "55.0 ± 5.0", "70.0 ± 0.0"]
    assert next(r for r in body if r[1] == "ERM (ID val)")[2:] == ["70.0 ± 0.0", "50.0 ± 0.0", "60.0 ± 0.0"]
    _, div = diversity_table(rows)
    assert div[0][1] == "2.000 ± 1.000" and div[0][3] == "15.000 ± 5.000"  # ratio (1, 3); gain 100 * (0.1, 0.2)


def test_bad_inputs(tmp_path: Path, tiny_sweep: Path) -> None:
    with pytest.raises(SoupsError, match="has no runs/ folder"):
        load_runs(tmp_path / "nowhere")
    with pytest.raises(SoupsError, match="no finished 'aux' run"):
        load_runs(tiny_sweep, stage="aux")
    with pytest.raises(SoupsError, match="unknown bn mode 'keep'"):
        Context(load_runs(tiny_sweep)[0].cfg, torch.device("cpu"), bn="keep")
    with pytest.raises(SoupsError, match="no averaging results"):
        collect(tmp_path)


def test_vision_domains_pareto_evaluator(tiny_sweep: Path) -> None:
    from soups.pareto_registry import build_evaluator
    from vision.pareto_eval import load_expert

    runs = load_runs(tiny_sweep)[:2]
    experts = [str(r.path / "best.safetensors") for r in runs]
    evaluator = build_evaluator({"name": "vision_domains", "domains": [0, "75deg"]}, experts=experts,
                                device=torch.device("cpu"))
    assert list(evaluator.objectives) == ["acc_0deg", "acc_75deg"]
    stats = evaluator.evaluate(load_expert(experts[0]))
    # the same split and checkpoint as train.py's summary: identical accuracies
    assert stats["acc_0deg"].mean == pytest.approx(runs[0].summary["best"]["accs"]["env0_in_acc"])
    assert stats["acc_75deg"].mean == pytest.approx(runs[0].summary["best"]["accs"]["env5_in_acc"])
    n = stats["acc_75deg"].n
    p = stats["acc_75deg"].mean
    if 0 < p < 1:  # stderr of a mean of 0/1 values: sqrt(p (1 - p) n / (n - 1)) / sqrt(n)
        assert stats["acc_75deg"].stderr == pytest.approx(math.sqrt(p * (1 - p) * n / (n - 1) / n))
    ensemble = evaluator.evaluate_ensemble([1.0, 0.0])  # λ = (1, 0): expert 0 alone
    assert ensemble["acc_75deg"].mean == pytest.approx(p)
    with pytest.raises(SoupsError, match="unknown domain 'sideways'"):
        build_evaluator({"name": "vision_domains", "domains": ["sideways"]}, experts=experts, device="cpu")


def test_run_order_depends_on_configs_not_directory_names(tiny_sweep: Path, tmp_path: Path) -> None:
    # the same runs under names that sort the other way round: ties in val accuracy (ERM pick, greedy ranking)
    # must break the same way, so the listing order must not change
    import shutil

    runs = sorted(p for p in (tiny_sweep / "runs").iterdir() if (p / "summary.json").is_file())
    for i, path in enumerate(runs):
        shutil.copytree(path, tmp_path / "runs" / f"{len(runs) - i:04d}-{path.name}")
    identity = [(r.key, r.cfg["hparams_seed"], r.cfg["tags"].get("stage")) for r in load_runs(tiny_sweep)]
    renamed = [(r.key, r.cfg["hparams_seed"], r.cfg["tags"].get("stage")) for r in load_runs(tmp_path)]
    assert len(identity) >= 3 and renamed == identity
    assert identity == sorted(identity, key=lambda t: (t[0], t[1]))  # grouped, then by hyper-parameter draw
