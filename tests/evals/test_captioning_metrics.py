"""Caption metrics (evals/captioning.py) against pycocoevalcap's own COCOEvalCap and CiderScorer.

The Java parts (PTB tokenizer, METEOR) start a JVM each; one session-scoped scorer is shared so the default run
pays METEOR's start-up once.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("pycocoevalcap")
pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO caption metrics need java")

from evals.captioning import (  # noqa: E402
    COCO_NAMES,
    CaptionScorer,
    CiderD,
    CorpusScores,
    bleu_from_stats,
    simple_tokenize,
)
from evals.errors import SoupsError  # noqa: E402

REFS = {
    1: ["A red square on the left.", "a red box at the left side", "The red square is left of center.",
        "a small red square", "red square, left"],
    2: ["Two blue circles near the top.", "two blue discs at the top", "blue circles above",
        "a pair of blue circles up top", "two circles, blue, near the top"],
    3: ["A green triangle next to a yellow circle.", "green triangle beside a yellow circle",
        "a yellow circle and a green triangle", "triangle (green) right of a circle",
        "the green triangle sits by the yellow circle"],
    4: ["A purple star.", "one purple star in the middle", "a star, purple, centred", "purple star",
        "the star is purple"],
}  # fmt: skip
CANDS = {1: "a red square on the left", 2: "two blue circles at the top of the image", 3: "a green triangle",
         4: "a purple star in the middle of the picture"}  # fmt: skip


@pytest.fixture(scope="session")
def scorer() -> CaptionScorer:
    s = CaptionScorer()
    yield s
    s.close()


class _NoSpice:
    """SPICE downloads CoreNLP on first use; COCOEvalCap runs it last, so it is stubbed out for the reference."""

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        return 0.0, [0.0] * len(gts)

    def method(self) -> str:
        return "SPICE"


class _Coco:
    def __init__(self, anns: dict) -> None:
        self.imgToAnns = anns

    def getImgIds(self) -> list:  # noqa: N802 (pycocotools' name)
        return list(self.imgToAnns)


def test_corpus_scores_equal_cocoevalcap(scorer: CaptionScorer, monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.eval as coco_eval

    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    gts = _Coco({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = _Coco({k: [{"caption": c}] for k, c in CANDS.items()})
    reference = coco_eval.COCOEvalCap(gts, res)
    reference.evaluate()
    ours = scorer.corpus(CANDS, REFS)
    assert set(ours.scores) == set(COCO_NAMES)
    for metric, coco_name in COCO_NAMES.items():
        assert ours.scores[metric] == pytest.approx(reference.eval[coco_name], abs=1e-6), metric
        per_image = [reference.imgToEval[k][coco_name] for k in ours.image_ids]
        np.testing.assert_allclose(ours.per_image[metric], per_image, atol=1e-6, err_msg=metric)
    assert 0 < ours.scores["bleu4"] < ours.scores["bleu1"] < 1  # a non-trivial set: the metrics disagree


def test_per_caption_cider_uses_the_training_document_frequencies() -> None:
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    refs = [[simple_tokenize(r) for r in v] for v in REFS.values()]
    cands = [simple_tokenize(c) for c in CANDS.values()]
    reference = CiderScorer(n=4, sigma=6.0)
    for c, r in zip(cands, refs):
        reference += (c, r)
    _, per_image = reference.compute_score()
    cider = CiderD(refs)  # document frequencies from the same four images: pycocoevalcap's numbers
    np.testing.assert_allclose([cider.score(c, r) for c, r in zip(cands, refs)], per_image, atol=1e-9)

    # A reward scores a batch of one image with the training corpus' frequencies, not the batch's own (with a
    # single image every n-gram would have idf log(1) - log(1) = 0 and every caption CIDEr 0).
    train = CaptionScorer(["cider"], tokenizer="simple", cider_df_refs=list(REFS.values()))
    alone = CaptionScorer(["cider"], tokenizer="simple")
    got = train.scores([CANDS[1]], [REFS[1]])["cider"]
    assert got[0] == pytest.approx(per_image[0], abs=1e-9)
    assert alone.scores([CANDS[1]], [REFS[1]])["cider"][0] == 0.0


def test_samples_sharing_references_score_like_separate_images(scorer: CaptionScorer) -> None:
    samples = ["a red square on the left", "a red box", "", "blue circles"]
    per = scorer.scores(samples, [REFS[1]] * 4)
    for metric, values in per.items():
        assert values.shape == (4,), metric
        assert np.isfinite(values).all(), metric
        assert values[2] == 0.0, metric  # the empty caption: a clean zero on every metric
    assert per["bleu1"][0] == pytest.approx(1.0)  # every unigram is in a reference, length matches one


def test_bleu_from_stats_hand_worked() -> None:
    # 3 words, reference of 4 words: precisions 2/3, 1/2; brevity exp(1 - 4/3)
    stats = np.array([3, 4, 3, 2, 1, 0, 2, 1, 0, 0])
    bleu = bleu_from_stats(stats)
    bp = np.exp(1 - 4 / 3)
    assert bleu[0] == pytest.approx(2 / 3 * bp, rel=1e-6)
    assert bleu[1] == pytest.approx(np.sqrt(2 / 3 * 1 / 2) * bp, rel=1e-6)
    assert bleu[3] == pytest.approx(0.0, abs=1e-3)


def test_bootstrap_stderr() -> None:
    same = CorpusScores(scores={"rouge_l": 0.5}, per_image={"rouge_l": np.full(10, 0.5)}, image_ids=list(range(10)))
    assert same.bootstrap_stderr()["rouge_l"] == 0.0
    values = np.arange(400) % 2.0  # stderr of a mean of 400 fair coin flips: 0.5 / sqrt(400) = 0.025
    spread = CorpusScores(scores={"cider": 0.5}, per_image={"cider": values}, image_ids=list(range(400)))
    assert spread.bootstrap_stderr(samples=2000)["cider"] == pytest.approx(0.025, rel=0.1)


def test_meteor_keeps_one_process(scorer: CaptionScorer) -> None:
    scorer.scores(["a red square"], [REFS[1]])
    pid = scorer._meteor._proc.pid  # type: ignore[union-attr]
    scorer.scores(["a blue circle"], [REFS[2]])
    assert scorer._meteor._proc.pid == pid  # type: ignore[union-attr]


def test_ptb_tokenisation_is_cached(scorer: CaptionScorer) -> None:
    assert scorer.tokenize(["A Red, square."]) == ["a red square"]
    scorer._ptb.java = "/nonexistent/java"  # a second call must not need java at all
    try:
        assert scorer.tokenize(["A Red, square."]) == ["a red square"]
    finally:
        scorer._ptb.java = "java"


def test_bad_input(scorer: CaptionScorer) -> None:
    with pytest.raises(SoupsError, match="image 2 has no reference captions"):
        scorer.corpus({1: "a", 2: "b"}, {1: ["a"], 2: []})
    with pytest.raises(SoupsError, match="image 3 has a caption but no reference captions"):
        scorer.corpus({1: "a", 3: "b"}, {1: ["a"]})
    with pytest.raises(SoupsError, match="caption 0 is NoneType"):
        scorer.scores([None], [["a"]])  # type: ignore[list-item]
    with pytest.raises(SoupsError, match="unknown caption metric"):
        CaptionScorer(["spice"])


def test_missing_java_names_meteor() -> None:
    with pytest.raises(SoupsError, match="METEOR.*java"):
        CaptionScorer(["meteor"], java="/nonexistent/java")
    scorer = CaptionScorer(["bleu1"], java="/nonexistent/java")  # the PTB tokenizer is the next to need it
    with pytest.raises(SoupsError, match="PTB tokenizer.*java"):
        scorer.scores(["a cat"], [["a cat"]])
    assert CaptionScorer(["bleu1", "rouge_l"], tokenizer="simple", java="/nonexistent/java").scores(
        ["a cat"], [["a cat"]]
    )["bleu1"][0] == pytest.approx(1.0)
