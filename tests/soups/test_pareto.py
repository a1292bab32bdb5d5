"""`python -m soups.pareto`: grid sizing, LMC table, hypervolume summary, trajectories, base checks, end to end.

The end-to-end test uses a toy evaluator whose objectives are closed-form functions of the weights, so the
front it writes can be checked exactly: with objectives a(θ) = −‖θ − θ_A‖² and b(θ) = −‖θ − θ_B‖² and
θ_λ = λ_1 θ_A + λ_2 θ_B, a(θ_λ) = −λ_2² D and b(θ_λ) = −λ_1² D with D = ‖θ_A − θ_B‖², so the LMC gap of both
objectives is −λ_2² D + λ_2 D = D λ_1 λ_2 (e.g. D/4 at λ = (½, ½)). A soup that did not really switch weights
per λ would fail it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from soups.pareto import (
    check_experts,
    grid_divisions,
    lmc_table,
    make_row,
    normalise_front,
    read_trajectory,
    run_front,
    summarise,
    vertex_index,
)
from soups.pareto_registry import EVALUATORS, ObjectiveStat
from soups.utils import SoupsError

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "pareto"


def _row(kind: str, lam: list[float] | None, a: float, b: float, se: float = 0.0, name: str = "") -> dict:
    return make_row(kind, name or kind, {"a": ObjectiveStat(a, se, 10), "b": ObjectiveStat(b, se, 10)}, lam=lam, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------


def test_grid_divisions_from_points_and_step() -> None:
    assert grid_divisions(2, n_points=11) == 10  # N=2: k + 1 points, 11 -> k = 10 (λ ∈ {0, 0.1, …, 1})
    assert grid_divisions(3, n_points=10) == 3  # N=3: C(k+2, 2) points; k=3 -> 10, k=4 -> 15 > 10
    assert grid_divisions(3, n_points=14) == 3
    assert grid_divisions(3, n_points=15) == 4
    assert grid_divisions(2, n_points=11, step=0.25) == 4  # step wins: 1 / 0.25 = 4
    with pytest.raises(SoupsError, match="step=0.3"):
        grid_divisions(2, step=0.3)  # 1/0.3 = 3.33 is not an integer
    with pytest.raises(SoupsError, match="fewer than the 3 experts"):
        grid_divisions(3, n_points=2)


def test_vertex_index() -> None:
    assert vertex_index([0.0, 1.0, 0.0]) == 1
    assert vertex_index([1.0, 0.0]) == 0
    assert vertex_index([0.5, 0.5]) is None


def test_make_row_rejects_unknown_kind() -> None:
    with pytest.raises(SoupsError, match="unknown point kind 'blend'"):
        make_row("blend", "x", {}, lam=None, seed=0)


def test_lmc_table_hand_worked() -> None:
    rows = [
        _row("expert", [1.0, 0.0], 1.0, 0.0, se=0.2),
        _row("expert", [0.0, 1.0], 0.0, 1.0, se=0.2),
        _row("soup", [0.5, 0.5], 0.6, 0.3, se=0.1),
    ]
    table = lmc_table(rows, ["a", "b"], n_experts=2)
    # gap_a = 0.6 − (0.5·1 + 0.5·0) = 0.1 ; gap_b = 0.3 − (0.5·0 + 0.5·1) = −0.2
    assert table["rows"][0]["gap"]["a"] == pytest.approx(0.1)
    assert table["rows"][0]["gap"]["b"] == pytest.approx(-0.2)
    # stderr = sqrt(0.1² + 0.5²·0.2² + 0.5²·0.2²) = sqrt(0.01 + 0.01 + 0.01) = sqrt(0.03)
    assert table["rows"][0]["stderr"]["a"] == pytest.approx(math.sqrt(0.03))
    assert table["fraction_nonnegative"] == pytest.approx(0.5)
    assert table["fraction_within_2se"] == pytest.approx(1.0)  # −0.2 ≥ −2·sqrt(0.03) ≈ −0.346
    assert table["holds"] is False
    with pytest.raises(SoupsError, match="expert vertices"):
        lmc_table(rows[1:], ["a", "b"], n_experts=2)


def test_normalise_init_worst_and_minmax() -> None:
    values = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # init (1, 0.5), worst (0, 0): x / 1 and y / 0.5
    normed, info = normalise_front(values, "init_worst", init=np.array([1.0, 0.5]))
    np.testing.assert_allclose(normed, [[2.0, 0.0], [0.0, 4.0], [1.0, 2.0]])
    assert info == {"mode": "init_worst", "zero": [0.0, 0.0], "one": [1.0, 0.5]}
    # min (0, 0), max (2, 2): v / 2
    np.testing.assert_allclose(normalise_front(values, "minmax")[0], values / 2)
    # every point ties on objective 1: it maps to 0 (span 1), objective 0 is scaled as usual
    tied = np.array([[1.0, 3.0], [3.0, 3.0]])
    normed, info = normalise_front(tied, "minmax")
    np.testing.assert_allclose(normed, [[0.0, 0.0], [1.0, 0.0]])
    assert info["flat_objectives"] == [1]
    with pytest.raises(SoupsError, match="needs the init"):
        normalise_front(values, "init_worst")
    with pytest.raises(SoupsError, match="init is the worst point on objective 1"):
        normalise_front(values, "init_worst", init=np.array([1.0, 0.0]))
    with pytest.raises(SoupsError, match="unknown normalise"):
        normalise_front(values, "zscore")


def test_summarise_hypervolumes_and_eum_hand_worked() -> None:
    rows = [
        _row("expert", [1.0, 0.0], 1.0, 0.0),
        _row("expert", [0.0, 1.0], 0.0, 1.0),
        _row("soup", [0.5, 0.5], 0.6, 0.7),
        _row("morl", [0.5, 0.5], 0.4, 0.4),
    ]
    summary = summarise(rows, ["a", "b"], n_experts=2, normalise="minmax", reference=None, eum_points=2)
    # minmax over all points: min (0, 0), max (1, 1) -> identity; reference (0, 0).
    # RS: the experts add no area, the soup a 0.6 × 0.7 box = 0.42.  MORL: 0.4 × 0.4 = 0.16.
    assert summary["hypervolume"]["rs"] == pytest.approx(0.42)
    assert summary["hypervolume"]["morl"] == pytest.approx(0.16)
    assert summary["reference_point"] == [0.0, 0.0]
    # EUM, weights (1,0), (½,½), (0,1): max w·v = 1, max(0.5, 0.5, 0.65) = 0.65, 1 -> 2.65 / 3
    assert summary["eum"]["rs"] == pytest.approx(2.65 / 3)
    # sparsity of the RS non-dominated set {(1,0), (0,1), (.6,.7)}: sorted a 0,.6,1 -> .36+.16; b 0,.7,1 -> .49+.09;
    # (0.52 + 0.58) / (3 − 1) = 0.55
    assert summary["fronts"]["rs"]["sparsity"] == pytest.approx(0.55)
    # The MORL point is dominated by the soup but not by the experts: all three are on the MORL front.
    assert {p["kind"] for p in summary["fronts"]["morl"]["non_dominated"]} == {"expert", "morl"}
    assert summary["lmc"]["rows"][0]["gap"] == pytest.approx({"a": 0.1, "b": 0.2})
    with pytest.raises(SoupsError, match="reference"):
        summarise(rows, ["a", "b"], n_experts=2, normalise="none", reference=[0.0], eum_points=2)


def test_read_trajectory(tmp_path: Path) -> None:
    lines = [{"step": 0, "reward/a": 0.1, "reward/b": 0.9}, {"step": 1, "loss": 3.0},
             {"step": 2, "reward/a": 0.5, "objectives/b": 0.4}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "final").mkdir()
    traj = read_trajectory(tmp_path / "final", ["a", "b"], ["objectives/{objective}", "reward/{objective}"])
    np.testing.assert_allclose(traj, [[0.1, 0.9], [0.5, 0.4]])  # step 1 has no objectives: skipped
    with pytest.raises(SoupsError, match="no step logs every objective"):
        read_trajectory(tmp_path, ["a", "c"], ["reward/{objective}"])
    with pytest.raises(SoupsError, match="no metrics.jsonl"):
        read_trajectory(tmp_path / "empty" / "nowhere", ["a"], ["{objective}"])


# ---------------------------------------------------------------------------------------------------------------
# Experts on different bases
# ---------------------------------------------------------------------------------------------------------------


def _tiny_gpt2(path: Path, n_embd: int = 8, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=16, n_embd=n_embd, n_layer=1, n_head=2, n_positions=16)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _adapter(base: Path, path: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False))
    model.save_pretrained(path)
    return path


def test_check_experts_refuses_different_bases(tmp_path: Path) -> None:
    base1, base2 = _tiny_gpt2(tmp_path / "base1"), _tiny_gpt2(tmp_path / "base2", seed=1)
    a, b = _adapter(base1, tmp_path / "a", 0), _adapter(base2, tmp_path / "b", 1)
    c = _adapter(base1, tmp_path / "c", 2)
    assert check_experts([str(a), str(c)]) == {"kind": "peft", "base": str(base1.resolve())}
    with pytest.raises(SoupsError, match="different bases") as err:
        check_experts([str(a), str(b)])
    assert str(a) in str(err.value) and str(b) in str(err.value)
    with pytest.raises(SoupsError, match="mix PEFT adapters and full checkpoints"):
        check_experts([str(a), str(base1)])
    wide = _tiny_gpt2(tmp_path / "wide", n_embd=12)  # c_attn bias: 3 · 8 = 24 vs 3 · 12 = 36
    with pytest.raises(SoupsError, match=r"different bases: tensor .*c_attn.bias' is \[24\] in .* but \[36\]"):
        check_experts([str(base1), str(wide)])


def test_cli_different_bases_is_one_clear_error(tmp_path: Path) -> None:
    base1, base2 = _tiny_gpt2(tmp_path / "base1"), _tiny_gpt2(tmp_path / "base2", seed=1)
    a, b = _adapter(base1, tmp_path / "a", 0), _adapter(base2, tmp_path / "b", 1)
    out = tmp_path / "front"
    proc = subprocess.run(
        [sys.executable, "-m", "soups.pareto", f"experts=[{a},{b}]", f"output={out}", "hydra.run.dir=" + str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "different bases" in lines[0] and str(b) in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# End to end with a closed-form evaluator
# ---------------------------------------------------------------------------------------------------------------


class DistanceEvaluator:
    """Objective i = −Σ_tensors ‖θ − θ_i‖² for expert i: closed form along the interpolation."""

    def __init__(self, experts: list[str]) -> None:
        from soups.checkpoint import open_checkpoint

        self.objectives = [f"near{i}" for i in range(len(experts))]
        ckpts = [open_checkpoint(p) for p in experts]
        self.targets = [{k: c.get_tensor(k).double() for k in c.keys() if c.dtype(k).is_floating_point}
                        for c in ckpts]  # fmt: skip

    def evaluate(self, model: torch.nn.Module) -> dict[str, ObjectiveStat]:
        state = model.state_dict()
        out = {}
        for name, target in zip(self.objectives, self.targets):
            dist = sum(float(((state[k].double() - t) ** 2).sum()) for k, t in target.items() if k in state)
            out[name] = ObjectiveStat(-dist, 0.0, 1)
        return out


if "test_distance" not in EVALUATORS:
    EVALUATORS.add("test_distance", lambda cfg, *, experts, device: DistanceEvaluator(experts))


class FakeSoup:
    """Stand-in for `soups.soup.Soup` while it is not in the tree: full checkpoints, in-place λ switch."""

    def __init__(self, paths: list[str]) -> None:
        from transformers import AutoModelForCausalLM

        from soups.checkpoint import open_checkpoint

        self.model = AutoModelForCausalLM.from_pretrained(paths[0])
        ckpts = [open_checkpoint(p) for p in paths]
        self.tensors = {k: [c.get_tensor(k) for c in ckpts] for k in ckpts[0].keys()}

    @classmethod
    def from_checkpoints(cls, paths: list[str], model=None, device=None, dtype=None) -> FakeSoup:  # noqa: ANN001
        return cls(paths)

    def set_weights(self, lambdas: list[float]) -> None:
        state = self.model.state_dict()
        with torch.no_grad():
            for key, tensors in self.tensors.items():
                state[key].copy_(sum(lam * t for lam, t in zip(lambdas, tensors)))


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_front_end_to_end_closed_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import soups.soup  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "soups.soup", type(sys)("soups.soup"))
        sys.modules["soups.soup"].Soup = FakeSoup  # type: ignore[attr-defined]
    a, b = _tiny_gpt2(tmp_path / "a", seed=0), _tiny_gpt2(tmp_path / "b", seed=1)
    init = tmp_path / "init"  # the midpoint of the experts: its objectives are −D/4 each, above the worst (−D)
    soup = FakeSoup([str(a), str(b)])
    soup.set_weights([0.5, 0.5])
    soup.model.save_pretrained(init)
    run = tmp_path / "run_a"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"objectives/near0": -1.0, "objectives/near1": -2.0}) + "\n"
                                       + json.dumps({"objectives/near0": -0.5, "objectives/near1": -2.5}) + "\n")
    out = tmp_path / "front"
    cfg = _compose([
        f"experts=[{a},{b}]", "expert_names=[A,B]", "evaluator.name=test_distance", f"init={init}",
        f"morl=[{{path: {a}, name: morl_copy, mu: [0.9, 0.1]}}]", f"trajectories=[{run}]", "grid.n_points=5",
        "normalise=init_worst", f"output={out}", "device=cpu",
    ])  # fmt: skip
    run_front(cfg)

    rows = [json.loads(line) for line in (out / "front.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["init", "morl", "expert", "soup", "soup", "soup", "expert"]
    assert rows[2]["name"] == "A" and rows[2]["lambda"] == [1.0, 0.0]  # grid order: λ_1 falls from 1 to 0
    assert rows[6]["name"] == "B" and rows[4]["lambda"] == [0.5, 0.5]
    assert rows[1]["lambda"] == [0.9, 0.1] and rows[1]["name"] == "morl_copy"
    dist = sum(float(((t[0].double() - t[1].double()) ** 2).sum()) for t in soup.tensors.values()
               if t[0].is_floating_point())  # D = ‖θ_A − θ_B‖²
    for row in rows[2:]:
        lam1, lam2 = row["lambda"]
        # a(θ_λ) = −λ_2² D, b(θ_λ) = −λ_1² D
        assert row["objectives"]["near0"]["mean"] == pytest.approx(-(lam2**2) * dist, rel=1e-5, abs=1e-6)
        assert row["objectives"]["near1"]["mean"] == pytest.approx(-(lam1**2) * dist, rel=1e-5, abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    for lmc_row in summary["lmc"]["rows"]:
        lam1, lam2 = lmc_row["lambda"]
        assert lmc_row["gap"]["near0"] == pytest.approx(dist * lam1 * lam2, rel=1e-5)  # D λ_1 λ_2 ≥ 0
    assert summary["lmc"]["holds"] is True
    assert summary["normalisation"]["mode"] == "init_worst"
    assert set(summary["hypervolume"]) == {"rs", "morl"} and summary["hypervolume"]["rs"] > 0
    assert summary["grid_divisions"] == 4
    assert (out / "front.png").stat().st_size > 10_000 and (out / "config.yaml").is_file()
    with pytest.raises(SoupsError, match="already exists"):
        run_front(cfg)


def test_front_three_experts_grid_and_dirichlet(tmp_path: Path) -> None:
    """N = 3: objective i = −‖θ_λ − θ_i‖²; its LMC gap is Σ_j λ_j ‖θ_j − θ_λ‖² (the λ-variance of the experts), the
    same for every objective — by Σ_j λ_j ‖θ_j − c‖² = ‖θ_λ − c‖² + Σ_j λ_j ‖θ_j − θ_λ‖² with c = θ_i."""
    paths = [_tiny_gpt2(tmp_path / f"e{i}", seed=i) for i in range(3)]
    out = tmp_path / "front"
    cfg = _compose([f"experts=[{paths[0]},{paths[1]},{paths[2]}]", "evaluator.name=test_distance", "grid.step=0.5",
                    "grid.dirichlet=2", f"output={out}", "device=cpu", "eum_divisions=2"])  # fmt: skip
    run_front(cfg)
    rows = [json.loads(line) for line in (out / "front.jsonl").read_text().splitlines()]
    assert len(rows) == 6 + 2  # C(2 + 2, 2) = 6 grid points + 2 Dirichlet samples
    assert sum(r["kind"] == "expert" for r in rows) == 3
    experts = FakeSoup([str(p) for p in paths]).tensors
    summary = json.loads((out / "summary.json").read_text())
    for lmc_row in summary["lmc"]["rows"]:
        lam = lmc_row["lambda"]
        mix = {k: sum(w * t[j].double() for j, w in enumerate(lam)) for k, t in experts.items()
               if t[0].is_floating_point()}  # fmt: skip
        variance = sum(w * sum(float(((t[j].double() - mix[k]) ** 2).sum()) for k, t in experts.items()
                               if t[0].is_floating_point()) for j, w in enumerate(lam))  # fmt: skip
        for i in range(3):
            assert lmc_row["gap"][f"near{i}"] == pytest.approx(variance, rel=1e-4)
    assert (out / "front.png").is_file() and set(summary["hypervolume"]) == {"rs"}


def test_smooth_trajectory_hand_worked() -> None:
    from soups.plots import smooth_trajectory

    traj = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0], [6.0, 1.0]])
    # window 2: [0], [(0+2)/2], [(2+4)/2], [(4+6)/2] = 0, 1, 3, 5 ; second column 1, 1, 2.5, 2.5
    np.testing.assert_allclose(smooth_trajectory(traj, 2), [[0, 1], [1, 1], [3, 2.5], [5, 2.5]])
    np.testing.assert_allclose(smooth_trajectory(traj, 1), traj)
    with pytest.raises(SoupsError, match="window 0"):
        smooth_trajectory(traj, 0)


def test_plot_front_pairwise_panels(tmp_path: Path) -> None:
    from PIL import Image

    from soups.plots import plot_front

    stats = {k: ObjectiveStat(v, 0.1, 5) for k, v in zip("xyz", (1.0, 0.0, 0.5))}
    rows = [make_row("expert", "e0", stats, lam=[1.0, 0.0], seed=0),
            make_row("expert", "e1", {k: ObjectiveStat(1 - v.mean, 0.1, 5) for k, v in stats.items()},
                     lam=[0.0, 1.0], seed=0),
            make_row("soup", "s", {k: ObjectiveStat(0.6, 0.1, 5) for k in "xyz"}, lam=[0.5, 0.5], seed=0)]  # fmt: skip
    path = plot_front(rows, list("xyz"), tmp_path / "f.png")
    width, height = Image.open(path).size
    assert width > 2 * height  # 3 pairwise panels side by side
    with pytest.raises(SoupsError, match=r"trajectory run has shape \(2, 2\), expected \[T, 3\]"):
        plot_front(rows, list("xyz"), tmp_path / "g.png", trajectories={"run": np.zeros((2, 2))})


def test_front_uniform_soup_point_added_once(tmp_path: Path) -> None:
    """grid.uniform=true adds λ = 1/N (with n_points = N: the experts and their uniform soup only), never twice."""
    paths = [_tiny_gpt2(tmp_path / f"e{i}", seed=i) for i in range(3)]
    out = tmp_path / "front"
    cfg = _compose([f"experts=[{paths[0]},{paths[1]},{paths[2]}]", "evaluator.name=test_distance", "grid.n_points=3",
                    "grid.uniform=true", f"output={out}", "device=cpu", "eum_divisions=2"])  # fmt: skip
    run_front(cfg)
    rows = [json.loads(line) for line in (out / "front.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("expert") == 3
    (soup,) = [r for r in rows if r["kind"] == "soup"]
    assert soup["lambda"] == pytest.approx([1 / 3] * 3)
    two = tmp_path / "two"
    run_front(_compose([f"experts=[{paths[0]},{paths[1]}]", "evaluator.name=test_distance", "grid.n_points=3",
                        "grid.uniform=true", f"output={two}", "device=cpu", "eum_divisions=2"]))  # fmt: skip
    lambdas = [json.loads(line)["lambda"] for line in (two / "front.jsonl").read_text().splitlines()]
    assert lambdas.count([0.5, 0.5]) == 1  # the grid already holds it
