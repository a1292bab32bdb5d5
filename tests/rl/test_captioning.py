"""The captioning family: SCST loss and baselines (hand-worked numbers), the scenes and Karpathy loaders, the
metric rewards, and rl/train_captioning.py's two stages on the embedded task (checkpoints, exact resume).

The training runs share one smoke XE init built once per session in a temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file

from rl import train_captioning
from rl.captioning.models import build_scene_tokenizer, decode_captions, sequence_mask
from rl.captioning.rewards import build_caption_rewards, greedy_baseline, leave_one_out_baseline, scst_loss
from rl.captioning.task import (
    CAPTIONS_VERSION,
    PLACE_PHRASES,
    ScenesConfig,
    build_caption_task,
    generate_scenes,
    load_karpathy,
    scene_words,
)
from soups.utils import SoupsError

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "train_captioning"


# ----------------------------------------------------------------------------------------------------------
# SCST maths
# ----------------------------------------------------------------------------------------------------------


def test_greedy_baseline_repeats_each_image_k_times() -> None:
    assert greedy_baseline(torch.tensor([0.5, 1.0]), 3).tolist() == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0]


def test_leave_one_out_baseline_hand_worked() -> None:
    # image 0: rewards 1, 2, 3 -> (2+3)/2, (1+3)/2, (1+2)/2; image 1: 0, 0, 3 -> 1.5, 1.5, 0
    got = leave_one_out_baseline(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0]), 3)
    assert got.tolist() == [2.5, 2.0, 1.5, 1.5, 1.5, 0.0]
    with pytest.raises(SoupsError, match="samples >= 2"):
        leave_one_out_baseline(torch.tensor([1.0]), 1)


def test_scst_loss_hand_worked() -> None:
    # sample 0: log-probs -1, -2 (the third token is after EOS); sample 1: -0.5, -0.5, -1
    logprobs = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, -0.5, -1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, baseline = torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.7])
    out = scst_loss(logprobs, mask, rewards, baseline)
    # advantages 0.5 and -0.5; sequence log-probs -3 and -2; loss = -mean(0.5·-3, -0.5·-2) = -mean(-1.5, 1) = 0.25
    assert out.advantage.tolist() == pytest.approx([0.5, -0.5])
    assert out.loss.item() == pytest.approx(0.25)
    out.loss.backward()
    # d loss / d logprob_st = -adv_s · mask_st / N
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.25, -0.25, 0.0], [0.25, 0.25, 0.25]]))


def test_scst_baseline_gets_no_gradient() -> None:
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    out = scst_loss(torch.zeros(2, 1, requires_grad=True), torch.ones(2, 1), rewards, rewards.mean().expand(2))
    out.loss.backward()
    assert rewards.grad is None


def test_sequence_mask_and_decoding_stop_at_eos() -> None:
    tok = build_scene_tokenizer()
    eos = tok.eos_token_id
    ids = tok("a red box", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[*ids, eos, ids[0]], [*ids, ids[1], ids[2]]])
    assert sequence_mask(tokens, eos).tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert decode_captions(tok, tokens, eos) == ["a red box", "a red box red box"]


# ----------------------------------------------------------------------------------------------------------
# Data and rewards
# ----------------------------------------------------------------------------------------------------------


def test_scenes_are_deterministic_with_five_distinct_references() -> None:
    cfg = ScenesConfig(n_train=50, n_val=5, n_test=5, max_shapes=3)
    a, b = generate_scenes(cfg, "train"), generate_scenes(cfg, "train")
    assert [s["refs"] for s in a] == [s["refs"] for s in b]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert generate_scenes(cfg, "val")[0]["refs"] != a[0]["refs"]
    vocab = set(scene_words())
    for s in a:
        assert len(set(s["refs"])) == 5
        assert s["image"].shape == (63, 63, 3) and s["image"].dtype == np.uint8
        assert (s["image"] != 245).any()  # at least one shape is drawn
        assert {w for r in s["refs"] for w in r.split()} <= vocab
    tok = build_scene_tokenizer()
    assert tok.unk_token_id not in tok(a[0]["refs"][0], add_special_tokens=False)["input_ids"]


def test_scene_references_mix_lengths_so_the_metrics_prefer_different_captions() -> None:
    """The first reference is short ("red box"), the others mix medium, long and very long templates; against
    them a short caption of safe words wins BLEU-1, a long one METEOR's recall, a medium one ROUGE-L."""
    from evals.captioning import CaptionScorer

    samples = generate_scenes(ScenesConfig(n_train=1, n_val=1, n_test=60, max_shapes=1), "test")
    lengths = [len(r.split()) for s in samples for r in s["refs"]]
    assert all(len(s["refs"][0].split()) == 2 for s in samples) and max(lengths) >= 10
    name = {"square": "square", "circle": "circle", "triangle": "triangle"}
    where = {p: phrases[0] for p, phrases in PLACE_PHRASES.items()}
    styles = {"short": lambda s, c, p: f"a {c} {name[s]}", "medium": lambda s, c, p: f"a {c} {name[s]} {where[p]}",
              "long": lambda s, c, p: f"there is a small {c} {name[s]} {where[p]} in the picture"}  # fmt: skip
    refs = {s["id"]: s["refs"] for s in samples}
    with CaptionScorer(["bleu1", "rouge_l"], tokenizer="simple") as scorer:
        got = {k: scorer.corpus({s["id"]: f(*s["objects"][0]) for s in samples}, refs).scores
               for k, f in styles.items()}  # fmt: skip
    assert max(got, key=lambda k: got[k]["bleu1"]) == "short"
    assert max(got, key=lambda k: got[k]["rouge_l"]) == "medium"


def test_karpathy_loader(tmp_path: Path) -> None:
    with pytest.raises(SoupsError, match="Karpathy split file .*missing.json not found"):
        load_karpathy(tmp_path / "missing.json", tmp_path, "train")
    images = [
        {"filepath": "train2014", "filename": "a.jpg", "split": "train", "cocoid": 1, "sentences": [{"raw": "A dog."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "cocoid": 2, "sentences": [{"raw": "A cat."}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "test", "cocoid": 3, "sentences": [{"raw": "A cow."}]},
    ]  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    train = load_karpathy(tmp_path / "dataset_coco.json", tmp_path, "train")
    assert [s["id"] for s in train] == [1, 2]  # restval joins train
    assert train[1]["path"] == str(tmp_path / "val2014" / "b.jpg") and train[1]["refs"] == ["A cat."]
    with pytest.raises(SoupsError, match="no image in split 'val'"):
        load_karpathy(tmp_path / "dataset_coco.json", tmp_path, "val")
    images[0]["sentences"] = []
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    with pytest.raises(SoupsError, match="image 1 has no reference captions"):
        load_karpathy(tmp_path / "dataset_coco.json", tmp_path, "train")


def test_caption_rewards_score_every_objective_and_scalarise() -> None:
    task = build_caption_task({"name": "scenes", "n_train": 20, "n_val": 2, "n_test": 2})
    refs = [s["refs"] for s in task.train]
    cfg = {"objectives": ["bleu1", "rouge", "cider"], "optimize": "morl", "weights": [0.25, 0.75, 0.0]}
    rewards, scorer = build_caption_rewards(cfg, refs)
    samples = task.train[:2]
    texts = [samples[0]["refs"][0], ""]
    raw = rewards(samples, texts)
    direct = scorer.scores(texts, [s["refs"] for s in samples])
    assert raw[:, 0].tolist() == pytest.approx(direct["bleu1"].tolist())
    assert raw[:, 1].tolist() == pytest.approx(direct["rouge_l"].tolist())
    assert raw[:, 2].tolist() == pytest.approx(direct["cider"].tolist())
    assert raw[0, 0] == pytest.approx(1.0) and raw[1].tolist() == [0.0, 0.0, 0.0]  # a reference; the empty caption
    assert rewards.scalar(raw).tolist() == pytest.approx((0.25 * raw[:, 0] + 0.75 * raw[:, 1]).tolist())
    with pytest.raises(SoupsError, match="unknown caption reward"):
        build_caption_rewards({"objectives": ["spice"]}, refs)
    with pytest.raises(SoupsError, match="sum to 1"):
        build_caption_rewards({"objectives": ["bleu1", "rouge"], "optimize": "morl", "weights": [1, 1]}, refs)


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------


def _cfg(tmp: Path, init_dir: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", f"output_dir={tmp}", f"model.init_dir={init_dir}",
                                             *overrides])  # fmt: skip


@pytest.fixture(scope="session")
def init_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("captioning") / "init"
    cfg = _cfg(path.parent / "unused", path)
    return train_captioning.ensure_xe_init(cfg, device=torch.device("cpu"), progress=False)


def test_xe_stage_saves_a_loadable_captioner(tmp_path: Path, init_dir: Path) -> None:
    from transformers import VisionEncoderDecoderModel

    final = train_captioning.train(_cfg(tmp_path / "xe", init_dir, "stage=xe", "xe.steps=5"))
    rows = [json.loads(line) for line in (tmp_path / "xe" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all(np.isfinite(r["xe/loss"]) for r in rows)
    model = VisionEncoderDecoderModel.from_pretrained(final)
    assert model.config.decoder_start_token_id == build_scene_tokenizer().bos_token_id


def test_scst_trains_the_decoder_only_logs_every_objective_and_resumes_exactly(tmp_path: Path, init_dir: Path) -> None:
    from transformers import VisionEncoderDecoderModel

    straight = train_captioning.train(_cfg(tmp_path / "a", init_dir, "reward=bleu1"))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("objective/bleu1", "objective/bleu4", "objective/rouge", "objective/cider", "scst/entropy",
                "scst/kl_to_init", "perf/samples_per_s"):  # fmt: skip
        assert key in rows[0] and np.isfinite(rows[0][key]), key
    assert rows[0]["scst/kl_to_init"] == pytest.approx(0.0, abs=1e-5)  # no update yet: the policy is the init
    assert rows[0]["reward/scalar"] == rows[0]["objective/bleu1"]
    init = VisionEncoderDecoderModel.from_pretrained(init_dir).state_dict()
    final = VisionEncoderDecoderModel.from_pretrained(straight).state_dict()
    assert all(torch.equal(init[k], final[k]) for k in init if k.startswith("encoder."))
    assert any(not torch.equal(init[k], final[k]) for k in init if k.startswith("decoder."))
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002"]

    # the same run cut after step 1 and resumed: the same weights as the uninterrupted one
    train_captioning.train(_cfg(tmp_path / "b", init_dir, "reward=bleu1", "scst.steps=1"))
    resumed = train_captioning.train(_cfg(tmp_path / "b", init_dir, "reward=bleu1", "resume=true"))
    a = load_file(tmp_path / "a" / "checkpoints" / "step-000002" / "trainable.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert VisionEncoderDecoderModel.from_pretrained(resumed) is not None


def test_scst_morl_with_lora_and_leave_one_out(tmp_path: Path, init_dir: Path) -> None:
    from transformers import VisionEncoderDecoderModel

    final = train_captioning.train(_cfg(tmp_path / "m", init_dir, "reward=morl", "reward.weights=[0.3,0.7]",
                                        "scst.params=lora", "scst.baseline=leave_one_out"))  # fmt: skip
    assert (tmp_path / "m" / "adapter" / "adapter_config.json").is_file()
    row = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward/scalar"] == pytest.approx(0.3 * row["objective/bleu1"] + 0.7 * row["objective/rouge"], rel=1e-5)
    assert row["reward/baseline"] == pytest.approx(row["reward/scalar"], rel=1e-5)  # leave-one-out: same mean
    merged = VisionEncoderDecoderModel.from_pretrained(final)  # LoRA merged: a plain captioner
    assert not any("lora" in k for k in merged.state_dict())


def test_xe_init_built_with_other_settings_is_refused(tmp_path: Path, init_dir: Path) -> None:
    with pytest.raises(SoupsError, match="built with other settings"):
        train_captioning.ensure_xe_init(_cfg(tmp_path, init_dir, "xe.steps=7"), device=torch.device("cpu"),
                                        progress=False)  # fmt: skip
    # an init built on the scenes' earlier references (same settings, no captions_version) is refused too
    info = json.loads((init_dir / "xe_info.json").read_text())
    assert info["settings"].pop("captions_version") == CAPTIONS_VERSION
    stale = tmp_path / "stale_init"
    stale.mkdir()
    (stale / "xe_info.json").write_text(json.dumps(info))
    with pytest.raises(SoupsError, match="built with other settings"):
        train_captioning.ensure_xe_init(_cfg(tmp_path, stale), device=torch.device("cpu"), progress=False)


# ----------------------------------------------------------------------------------------------------------
# Soups of captioners: the evaluator, and a written soup equals the resident one
# ----------------------------------------------------------------------------------------------------------


def _perturbed_experts(init_dir: Path, tmp: Path) -> list[Path]:
    """Two captioners: the init with its decoder moved in two seeded directions (saved as the trainer saves)."""
    from rl.captioning.models import load_captioner

    out = []
    for i in range(2):
        captioner = load_captioner(str(init_dir))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in captioner.model.named_parameters():
                if name.startswith("decoder.") and param.is_floating_point():
                    param.add_(0.3 * param.std() * torch.randn(param.shape, generator=gen))
        captioner.save(tmp / f"expert{i}")
        out.append(tmp / f"expert{i}")
    return out


def test_mixed_captioner_loads_with_from_pretrained_and_captions_like_the_resident_soup(
    tmp_path: Path, init_dir: Path
) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    from rl.captioning.evaluator import greedy_captions
    from soups.merge import mix
    from soups.soup import Soup

    experts = _perturbed_experts(init_dir, tmp_path)
    task = build_caption_task({"name": "scenes", "n_train": 1, "n_val": 1, "n_test": 24})
    images = [s["image"] for s in task.test]
    tok, proc = AutoTokenizer.from_pretrained(experts[0]), AutoImageProcessor.from_pretrained(experts[0])
    lam = [0.3, 0.7]
    soup = Soup.from_checkpoints([str(p) for p in experts], progress=False)
    resident = greedy_captions(soup.set_weights(lam), tok, proc, images)
    ends = [greedy_captions(soup.set_weights(w), tok, proc, images) for w in ([1.0, 0.0], [0.0, 1.0])]
    assert ends[0] != ends[1]  # the experts caption differently, so agreeing at λ is not trivial

    mix([str(p) for p in experts], lam, tmp_path / "soup", progress=False)
    written = VisionEncoderDecoderModel.from_pretrained(tmp_path / "soup").eval()
    assert greedy_captions(written, tok, proc, images) == resident


def test_captioning_evaluator_scores_every_objective(tmp_path: Path, init_dir: Path) -> None:
    from soups.pareto_registry import build_evaluator

    experts = [str(p) for p in _perturbed_experts(init_dir, tmp_path)]
    cfg = {"name": "captioning", "task": {"name": "scenes", "n_train": 1, "n_val": 1, "n_test": 20},
           "objectives": ["bleu1", "bleu4", "rouge", "cider"], "tokenizer": "simple", "bootstrap": 50}  # fmt: skip
    evaluator = build_evaluator(cfg, experts=experts, device=torch.device("cpu"))
    from rl.captioning.models import load_captioner

    model = load_captioner(experts[0]).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = evaluator.evaluate(model)
    assert list(stats) == ["bleu1", "bleu4", "rouge", "cider"]
    assert all(s.n == 20 and np.isfinite(s.mean) and s.stderr >= 0 for s in stats.values())
    assert stats == evaluator.evaluate(model)  # greedy: deterministic
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the reported numbers are the scorer's corpus scores of the captions
    direct = evaluator.scorer.corpus(dict(zip(range(20), evaluator.last_captions)),
                                     dict(enumerate(s["refs"] for s in evaluator.samples)))  # fmt: skip
    assert stats["bleu1"].mean == pytest.approx(direct.scores["bleu1"])
    assert stats["cider"].mean == pytest.approx(direct.scores["cider"])


@pytest.mark.slow
def test_quickstart_captioning_smoke_writes_the_front_and_a_loadable_soup(tmp_path: Path) -> None:
    import subprocess
    import sys

    from transformers import VisionEncoderDecoderModel

    out = tmp_path / "qs"
    done = subprocess.run([sys.executable, "-m", "soups.quickstart", "task=captioning", "experiment=smoke",
                           f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("front.jsonl", "summary.json", "front.png"):
        assert (out / "front" / name).is_file(), name
    rows = [json.loads(line) for line in (out / "front" / "front.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} >= {"expert", "morl", "init"}
    assert set(rows[0]["objectives"]) == {"bleu1", "bleu4", "rouge", "meteor", "cider"}
    assert VisionEncoderDecoderModel.from_pretrained(out / "soup") is not None
    for name in ("uniform_soup.md", "fig6_4a_lambda_vs_mu.png", "fig6_4b_metrics_vs_lambda.png",
                 "captioning_summary.json"):  # fmt: skip
        assert (out / "captioning" / name).is_file(), name
    summary = json.loads((out / "captioning" / "captioning_summary.json").read_text())
    assert set(summary["uniform"]["soup_beats_init"]) == {"bleu1", "bleu4", "rouge", "meteor", "cider"}
    assert len(summary["fig_6_4a"]["lambda_val"]) == 11 and "rs" in summary["hypervolume_test"]
    conflict = summary["conflict"]  # the smoke experts: the table is written, whatever they learnt
    assert set(conflict["experts"]) == {"bleu1", "rouge", "cider"} and conflict["n_experts"] == 3
    assert conflict["experts"]["rouge"]["metric"] == "rouge_l"
    assert "won (paired)" in (out / "captioning" / "uniform_soup.md").read_text()


# ----------------------------------------------------------------------------------------------------------
# The conflict: paired bootstrap of the experts' own-metric margins (rl/captioning/figures.py)
# ----------------------------------------------------------------------------------------------------------


def _scores(per_image: dict[str, list[float]], bleu_stats: list[list[float]] | None = None):
    from evals.captioning import CorpusScores

    n = len(next(iter(per_image.values())))
    arrays = {m: np.asarray(v, dtype=float) for m, v in per_image.items()}
    stats = np.asarray(bleu_stats, dtype=float) if bleu_stats is not None else np.zeros((n, 10))
    return CorpusScores({m: float(v.mean()) for m, v in arrays.items()}, arrays, list(range(n)), stats)


def test_paired_difference_stderr_hand_worked() -> None:
    from rl.captioning.figures import corpus_statistic, paired_difference_stderr

    a, b = _scores({"rouge_l": [1, 0, 1]}), _scores({"rouge_l": [0, 0, 1]})
    idx = np.array([[0, 1, 2], [1, 1, 2], [0, 0, 0]])
    # a: 2/3, 1/3, 1; b: 1/3, 1/3, 0; differences 1/3, 0, 1: mean 4/9, deviations -1/9, -4/9, 5/9 -> sd √21 / 9
    assert corpus_statistic(a, "rouge_l", idx) == pytest.approx([2 / 3, 1 / 3, 1])
    assert paired_difference_stderr(a, b, "rouge_l", idx) == pytest.approx(21**0.5 / 9)
    # BLEU-1 is re-aggregated: [testlen, reflen, guess1..4, correct1..4] summed over the resampled images.
    # a matches 2/2 and 1/2 unigrams, b 1/2 and 1/2; resamples {0,1}, {0,0}, {1,1}: a 3/4, 1, 1/2; b 1/2 each;
    # differences 1/4, 1/2, 0 -> sd 1/4.
    row = lambda c: [2, 2, 2, 1, 0, 0, c, 0, 0, 0]  # noqa: E731
    a, b = _scores({"bleu1": [1, 0.5]}, [row(2), row(1)]), _scores({"bleu1": [0.5, 0.5]}, [row(1), row(1)])
    idx = np.array([[0, 1], [0, 0], [1, 1]])
    assert corpus_statistic(a, "bleu1", idx) == pytest.approx([0.75, 1.0, 0.5], abs=1e-6)
    assert paired_difference_stderr(a, b, "bleu1", idx) == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(SoupsError, match="same images"):
        c = _scores({"rouge_l": [1, 0]})
        c.image_ids = [5, 6]
        paired_difference_stderr(c, _scores({"rouge_l": [1, 0]}), "rouge_l", np.array([[0, 1]]))


def test_expert_conflict_judges_each_own_metric_against_every_rival() -> None:
    from rl.captioning.figures import expert_conflict

    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, size=200)  # per-image difficulty shared by every expert: pairing removes it
    shift = {"rouge": (0.01, 0.0), "cider": (0.0, 0.0), "meteor": (0.0, 0.0)}  # (rouge_l, cider) offsets
    results = {e: _scores({"rouge_l": list(base + dr), "cider": list(2 * base + dc), "meteor": list(base)})
               for e, (dr, dc) in shift.items()}  # fmt: skip
    out = expert_conflict(results, samples=300, seed=1)
    rouge = out["experts"]["rouge"]
    assert rouge["metric"] == "rouge_l" and rouge["margin"] == pytest.approx(0.01)
    # a constant shift on the same images: the paired stderr is 0, the independent one is not
    assert rouge["paired_stderr"] == pytest.approx(0.0, abs=1e-12) and rouge["independent_stderr"] > 0.01
    assert rouge["won_paired"] and not rouge["won_independent"]
    assert not out["experts"]["cider"]["won_paired"]  # tied with the rouge and meteor experts
    assert out["wins_paired"] == 1 and out["wins_independent"] == 0 and out["n_experts"] == 3
    assert "| rouge | rouge_l |" in out["markdown"]
    with pytest.raises(SoupsError, match="no own metric"):
        expert_conflict({"spice": results["rouge"], "rouge": results["rouge"]})
