"""Prompt tasks for RLHF: the embedded offline `facts_summary` task and Hub/local datasets (`hf_dataset`).

A task yields prompts: `build_task(cfg).train` and `.eval` are lists of sample dicts, each with at least
`"prompt"` (a string) plus task fields the rewards read (`"document"`, `"facts"`, ...).

The embedded task (`facts_summary`) is synthetic summarisation generated from a seed. A document is a few
facts about animals, e.g. ``the fox is red . the fox eats berries . the owl lives in the forest .``; the
prompt is the document followed by ``summary :``. Each fact is a triple (entity, relation, value) with
three relations (`color`, `habitat`, `food`) written with fixed templates, so a response can be parsed
back into triples exactly (`parse_statements`) and scored by rule rewards (`rl.text.rewards`).

The shared init of the embedded task is a tiny decoder-only model SFT-trained on IMPERFECT reference
summaries (some facts dropped, some facts contradicted or made up), built by `rl.text.sft.ensure_sft_init`.
We write the task generator and the word-level tokenizer (`rl.text.models.build_tokenizer`) ourselves because
no library ships a deterministic, offline, parseable summarisation task; the tokenizer itself is
`tokenizers.WordLevel` wrapped in `PreTrainedTokenizerFast`, so it saves and loads like any Hub tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from soups.registry import Registry
from soups.utils import SoupsError

# ----------------------------------------------------------------------------------------------------------
# Vocabulary of the embedded task
# ----------------------------------------------------------------------------------------------------------

ENTITIES: tuple[str, ...] = (
    "fox", "bear", "owl", "wolf", "deer", "frog", "hawk", "otter", "mole", "crow", "seal", "lynx",
)  # fmt: skip
VALUES: dict[str, tuple[str, ...]] = {
    "color": ("red", "brown", "grey", "white", "black", "golden", "green", "spotted"),
    "habitat": ("forest", "river", "desert", "cave", "meadow", "swamp", "mountain", "lake"),
    "food": ("berries", "fish", "mice", "insects", "seeds", "grass", "nuts", "honey"),
}
RELATIONS: tuple[str, ...] = tuple(VALUES)
# The words between "the <entity>" and the value, per relation.
TEMPLATES: dict[str, tuple[str, ...]] = {"color": ("is",), "habitat": ("lives", "in", "the"), "food": ("eats",)}
SUMMARY_MARKER = "summary :"
PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"

Fact = tuple[str, str, str]  # (entity, relation, value)


def task_words() -> list[str]:
    """All words of the embedded task, in a fixed order (the tokenizer vocabulary after the specials)."""
    words = ["the", ".", "summary", ":"]
    for rel in RELATIONS:
        words += [w for w in TEMPLATES[rel] if w not in words]
    words += list(ENTITIES)
    for rel in RELATIONS:
        words += list(VALUES[rel])
    return words


def fact_sentence(fact: Sequence[str]) -> str:
    """Writes a fact as its template sentence, e.g. ("fox", "habitat", "forest") -> "the fox lives in the forest ."."""
    entity, relation, value = fact
    return " ".join(["the", entity, *TEMPLATES[relation], value, "."])


def _parse_sentence(tokens: Sequence[str]) -> Fact | None:
    """One sentence (tokens without the final ".") -> a fact triple, or None when it is not a well-formed fact."""
    if len(tokens) < 4 or tokens[0] != "the" or tokens[1] not in ENTITIES:
        return None
    for relation, middle in TEMPLATES.items():
        if tuple(tokens[2:-1]) == middle and tokens[-1] in VALUES[relation]:
            return (tokens[1], relation, tokens[-1])
    return None


def parse_statements(text: str) -> list[Fact | None]:
    """Splits a response into sentences at "." and parses each into a fact triple.

    Robust to garbage: any sentence that is not exactly a fact template (unknown words, a truncated
    sentence without its ".", a value of the wrong relation) yields None. Empty sentences are skipped.

    Args:
        text: A response, words separated by whitespace.

    Returns:
        One entry per non-empty sentence, in order: a (entity, relation, value) triple or None.
    """
    out: list[Fact | None] = []
    sentence: list[str] = []
    for token in text.split():
        if token == ".":
            if sentence:
                out.append(_parse_sentence(sentence))
            sentence = []
        else:
            sentence.append(token)
    if sentence:  # trailing text without a full stop: an unfinished statement
        out.append(None)
    return out


# ----------------------------------------------------------------------------------------------------------
# The embedded task generator
# ----------------------------------------------------------------------------------------------------------


@dataclass
class FactsSummaryConfig:
    """Settings of the synthetic task (see `configs/train_ppo/task/facts_summary.yaml` for the trade-offs)."""

    seed: int = 0
    n_train: int = 512
    n_eval: int = 128
    min_entities: int = 1
    max_entities: int = 2
    min_facts: int = 2
    max_facts: int = 5
    p_keep: float = 0.7  # reference summaries keep each fact with this probability (at least one)
    p_contradict: float = 0.15  # ... replace a kept fact's value by a wrong one with this probability
    p_unsupported: float = 0.35  # ... append a made-up fact about a document entity with this probability

    def __post_init__(self) -> None:
        if not 1 <= self.min_entities <= self.max_entities <= len(ENTITIES):
            raise SoupsError(f"facts_summary: need 1 <= min_entities <= max_entities, got {self.min_entities}, "
                             f"{self.max_entities}")
        if not 1 <= self.min_facts <= self.max_facts:
            raise SoupsError(f"facts_summary: need 1 <= min_facts <= max_facts, got {self.min_facts}, {self.max_facts}")
        if self.max_facts > self.max_entities * len(RELATIONS) or self.min_facts > self.max_entities * len(RELATIONS):
            raise SoupsError(f"facts_summary: {self.max_facts} facts do not fit {self.max_entities} entities x "
                             f"{len(RELATIONS)} relations")
        for name in ("p_keep", "p_contradict", "p_unsupported"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise SoupsError(f"facts_summary: {name}={p} is not a probability")
        if self.n_train < 0 or self.n_eval < 0:
            raise SoupsError(f"facts_summary: n_train={self.n_train}, n_eval={self.n_eval} must be >= 0")

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | Any) -> FactsSummaryConfig:
        """Builds from a Hydra node or dict, ignoring keys that are not settings (e.g. `name`, `sft`)."""
        data = _to_dict(cfg)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def sample_document(rng: random.Random, cfg: FactsSummaryConfig) -> list[Fact]:
    """Draws the facts of one document: distinct entities, distinct relations per entity.

    Returns:
        Between `min_facts` and `max_facts` triples, grouped by entity, relations in random order.
    """
    while True:
        n_entities = rng.randint(cfg.min_entities, cfg.max_entities)
        entities = rng.sample(ENTITIES, n_entities)
        lo = max(cfg.min_facts, n_entities)
        hi = min(cfg.max_facts, n_entities * len(RELATIONS))
        if lo <= hi:
            break
    n_facts = rng.randint(lo, hi)
    # Every entity gets at least one fact; the rest are spread over the free (entity, relation) slots.
    slots = [(e, r) for e in entities for r in RELATIONS]
    chosen = [(e, rng.choice(RELATIONS)) for e in entities]
    free = [s for s in slots if s not in chosen]
    chosen += rng.sample(free, n_facts - len(chosen))
    facts = []
    for entity in entities:
        rels = [r for e, r in chosen if e == entity]
        rng.shuffle(rels)
        facts += [(entity, r, rng.choice(VALUES[r])) for r in rels]
    return facts


def imperfect_summary(rng: random.Random, facts: Sequence[Fact], cfg: FactsSummaryConfig) -> list[Fact]:
    """An imperfect reference summary, as noisy human/LLM references are.

    Each fact is kept with probability `p_keep` (at least one is kept), in document order; a kept fact's
    value is replaced by a wrong one with probability `p_contradict`; with probability `p_unsupported` a
    made-up fact about a document entity (a relation the document does not state) is appended at the end.
    Appending made-up content at the end couples length with hallucination, as in real summaries.
    """
    keep = [f for f in facts if rng.random() < cfg.p_keep] or [rng.choice(list(facts))]
    out: list[Fact] = []
    for entity, relation, value in keep:
        if rng.random() < cfg.p_contradict:
            value = rng.choice([v for v in VALUES[relation] if v != value])
        out.append((entity, relation, value))
    stated = {(e, r) for e, r, _ in facts}
    free = [(e, r) for e in dict.fromkeys(e for e, _, _ in facts) for r in RELATIONS if (e, r) not in stated]
    if free and rng.random() < cfg.p_unsupported:
        entity, relation = rng.choice(free)
        out.append((entity, relation, rng.choice(VALUES[relation])))
    return out


def make_sample(facts: Sequence[Fact], reference: Sequence[Fact], index: int) -> dict[str, Any]:
    """The sample dict of one document: prompt, document, facts (JSON-friendly lists) and reference."""
    document = " ".join(fact_sentence(f) for f in facts)
    return {
        "id": index,
        "prompt": f"{document} {SUMMARY_MARKER}",
        "document": document,
        "facts": [list(f) for f in facts],
        "reference": " ".join(fact_sentence(f) for f in reference),
    }


def generate_facts_summary(cfg: FactsSummaryConfig, n: int, split: str) -> list[dict[str, Any]]:
    """Generates `n` samples of one split; deterministic in (cfg.seed, split), independent across splits."""
    split_seed = int.from_bytes(hashlib.sha256(f"facts_summary/{cfg.seed}/{split}".encode()).digest()[:8], "big")
    rng = random.Random(split_seed)
    samples = []
    for i in range(n):
        facts = sample_document(rng, cfg)
        samples.append(make_sample(facts, imperfect_summary(rng, facts, cfg), i))
    return samples


# ----------------------------------------------------------------------------------------------------------
# Tasks and the registry
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PromptTask:
    """Prompts for RL training and evaluation.

    Attributes:
        name: The task's registry name.
        train: Training samples; each dict has at least "prompt".
        eval: Held-out evaluation samples (same keys).
        info: Free-form description (settings, source), saved beside results.
    """

    name: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


TASKS: Registry[Callable[[Any], PromptTask]] = Registry("task")


def build_task(cfg: Mapping[str, Any] | Any) -> PromptTask:
    """Builds the task named `cfg.name` from its config node (a Hydra node or a dict).

    Raises:
        UnknownNameError: `cfg.name` is not a registered task; the message lists the valid ones.
    """
    data = _to_dict(cfg)
    if "name" not in data:
        raise SoupsError(f"task config has no 'name'; valid names: {', '.join(TASKS.names())}")
    return TASKS.get(str(data["name"]))(data)


@TASKS.register("facts_summary")
def build_facts_summary(cfg: Mapping[str, Any]) -> PromptTask:
    """The embedded offline task; deterministic from `cfg.seed`."""
    settings = FactsSummaryConfig.from_cfg(cfg)
    return PromptTask(
        name="facts_summary",
        train=generate_facts_summary(settings, settings.n_train, "train"),
        eval=generate_facts_summary(settings, settings.n_eval, "eval"),
        info={"settings": asdict(settings)},
    )


@TASKS.register("hf_dataset")
def build_hf_dataset(cfg: Mapping[str, Any]) -> PromptTask:
    """Prompts from `datasets.load_dataset(path, name)` — a Hub id or a local path (dir, json/csv/parquet file).

    Config keys: `path`, `subset` (dataset config name), `train_split`, `eval_split`, `text_column`,
    `prompt_template` (a `str.format` template with `{text}` and any other column), `document_column`
    (copied to sample["document"] for rewards that read the source text; default: the processed text),
    `cut_at` (keep the text before the first occurrence of this string, e.g. the first "\n\nAssistant:" of
    an Anthropic HH dialogue),
    `max_text_words` (keep the first words, e.g. the opening of a movie review to continue),
    `max_text_chars`, `n_train`, `n_eval`, `seed` (shuffles before taking the first n), `data_files`.
    """
    import datasets

    path = cfg.get("path")
    if not path:
        raise SoupsError("hf_dataset task: set task.path to a Hub dataset id or a local path")
    text_column = cfg.get("text_column", "text")
    template = cfg.get("prompt_template", "{text}")
    document_column = cfg.get("document_column")  # null: the processed text itself
    max_chars = cfg.get("max_text_chars")
    max_words = cfg.get("max_text_words")
    cut_at = cfg.get("cut_at")
    seed = int(cfg.get("seed", 0))
    kwargs: dict[str, Any] = {}
    if cfg.get("data_files"):
        kwargs["data_files"] = cfg["data_files"]
    load_path = str(path)
    local = Path(load_path)
    if local.is_file():  # a single data file: pick the builder from its extension
        builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(local.suffix)
        if builder is None:
            raise SoupsError(f"hf_dataset task: cannot read {local} (expected .json/.jsonl/.csv/.parquet or a dir)")
        kwargs["data_files"] = str(local)
        load_path = builder

    def _split(split: str | None, n: int | None) -> list[dict[str, Any]]:
        if not split or n == 0:
            return []
        try:
            ds = datasets.load_dataset(load_path, cfg.get("subset"), split=split, **kwargs)
        except Exception as err:  # noqa: BLE001 - any loading failure is a bad-input error for the user
            raise SoupsError(f"hf_dataset task: cannot load {path!r} split {split!r}: {err}") from err
        if text_column not in ds.column_names:
            raise SoupsError(f"hf_dataset task: {path!r} split {split!r} has no column {text_column!r}; "
                             f"columns: {', '.join(ds.column_names)}")
        ds = ds.shuffle(seed=seed)
        if n is not None:
            ds = ds.select(range(min(int(n), len(ds))))
        out = []
        for i, row in enumerate(ds):
            row = dict(row)
            text = str(row[text_column])
            if cut_at:
                text = text.split(str(cut_at), 1)[0]
            text = text.strip()
            if max_words:
                text = " ".join(text.split()[: int(max_words)])
            if max_chars:
                text = text[: int(max_chars)]
            row["text"] = text
            try:
                prompt = template.format(**row)
            except KeyError as err:
                raise SoupsError(f"hf_dataset task: prompt_template uses {err} which is not a column of {path!r}") \
                    from err
            if document_column and document_column != text_column:
                if document_column not in row:
                    raise SoupsError(f"hf_dataset task: {path!r} has no document_column {document_column!r}")
                document = str(row[document_column]).strip()[: int(max_chars) if max_chars else None]
            else:
                document = text
            out.append({"id": i, "prompt": prompt, "document": document})
        return out

    return PromptTask(
        name="hf_dataset",
        train=_split(cfg.get("train_split", "train"), cfg.get("n_train")),
        eval=_split(cfg.get("eval_split"), cfg.get("n_eval")),
        info={"path": str(path), "text_column": text_column, "prompt_template": template},
    )


def default_cache_dir() -> Path:
    """Where built artefacts of the embedded task go by default: $SOUPS_CACHE or ~/.cache/soups."""
    return Path(os.environ.get("SOUPS_CACHE", Path.home() / ".cache" / "soups"))


def _to_dict(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A Hydra node or mapping -> a plain dict (resolved)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise SoupsError(f"expected a config mapping, got {type(cfg).__name__}")
