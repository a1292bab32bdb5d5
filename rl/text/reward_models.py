"""Tiny reward MODELS for the embedded task, so the model-reward path runs end to end offline.

`ensure_reward_models(dir)` trains two small BERT sequence classifiers (from config, random init) on
synthetic preference pairs labelled by the rule rewards of `rl.text.rewards`, and saves each with
`save_pretrained` beside its tokenizer. They are then loaded exactly as a Hub reward model is
(`rl.text.rewards.ModelReward`), with the paper's two scoring conventions:

- `complete`: one logit (num_labels = 1) read as the reward, on the single text
  ``<document> summary : <response>`` — like the completeness model `Tristan/gpt2_reward_summarization`.
- `faithful`: two labels (0 = hallucinated, 1 = faithful) scored as logit[1] − logit[0], on the text pair
  (response, document) — like `CogComp/bart-faithful-summary-detector`, summary first.

Training is the Bradley–Terry pairwise loss −log σ(s(chosen) − s(rejected)) (Christiano et al. 2017;
Stiennon et al. 2020). Candidates are perturbations of a document's facts (dropped, contradicted, made-up,
foreign, repeated, malformed and truncated statements), so the models see the kinds of errors a policy
makes. The loop is hand-written rather than trl's `RewardTrainer` to stay a few seconds long,
deterministic, and free of an output directory of its own (the caller saves atomically).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rl.text.rewards import REWARDS, CompleteReward, FaithfulReward, ModelReward, label_score
from rl.text.task import (
    ENTITIES,
    RELATIONS,
    VALUES,
    FactsSummaryConfig,
    default_cache_dir,
    fact_sentence,
    generate_facts_summary,
    task_words,
)
from soups.cli import bar_disabled
from soups.utils import SoupsError, atomic_dir, seed_everything, write_json

# How each tiny reward model is read, mirroring the paper's two Hub reward models.
RM_SPECS: dict[str, dict[str, Any]] = {
    "complete": {"num_labels": 1, "label": 0, "minus_label": None, "text": "{document} summary : {response}",
                 "text_pair": None},
    "faithful": {"num_labels": 2, "label": 1, "minus_label": 0, "text": "{response}", "text_pair": "{document}"},
}  # fmt: skip
INFO_FILE = "reward_info.json"


@dataclass
class RewardModelConfig:
    """Settings of the tiny reward models (`smoke=True` in `ensure_reward_models` shrinks the run)."""

    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    n_docs: int = 2048  # training documents (2 candidates each -> one preference pair per document)
    n_eval_docs: int = 256  # held-out documents for the pairwise accuracy reported in reward_info.json
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------


def build_reward_tokenizer() -> Any:
    """Word-level tokenizer over the task vocabulary with BERT specials: "[CLS] a [SEP]" / "[CLS] a [SEP] b [SEP]"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate([*specials, *task_words()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip
    tokenizer.model_max_length = 256
    return tokenizer


def build_reward_classifier(cfg: RewardModelConfig, vocab_size: int, num_labels: int, pad_token_id: int) -> Any:
    """A tiny BERT sequence classifier from config (random init, seeded by the caller)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=2 * cfg.hidden_size, max_position_embeddings=256,
        type_vocab_size=2, num_labels=num_labels, pad_token_id=pad_token_id, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    if num_labels == 2:
        config.id2label, config.label2id = {0: "hallucinated", 1: "faithful"}, {"hallucinated": 0, "faithful": 1}
    return BertForSequenceClassification(config)


# ----------------------------------------------------------------------------------------------------------
# Synthetic candidates and preference pairs
# ----------------------------------------------------------------------------------------------------------


def perturbed_summary(rng: random.Random, facts: Sequence[Sequence[str]]) -> str:
    """A random candidate summary of a document: a noisy subset of its facts.

    Each fact is kept with a per-candidate probability; kept facts may be contradicted; made-up facts about
    document entities, facts about foreign entities, repeats, malformed sentences and a truncated ending are
    added at random. Returns the text (possibly empty).
    """
    facts = [tuple(f) for f in facts]
    p_keep, p_wrong = rng.random(), rng.choice([0.0, 0.0, 0.2, 0.5])
    out: list[tuple[str, str, str]] = []
    for entity, relation, value in facts:
        if rng.random() < p_keep:
            if rng.random() < p_wrong:
                value = rng.choice([v for v in VALUES[relation] if v != value])
            out.append((entity, relation, value))
    stated = {(e, r) for e, r, _ in facts}
    free = [(e, r) for e in dict.fromkeys(e for e, _, _ in facts) for r in RELATIONS if (e, r) not in stated]
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        if free:
            entity, relation = rng.choice(free)
            out.append((entity, relation, rng.choice(VALUES[relation])))
    if rng.random() < 0.15:
        entity, relation = rng.choice(ENTITIES), rng.choice(RELATIONS)
        if entity not in {e for e, _, _ in facts}:
            out.append((entity, relation, rng.choice(VALUES[relation])))
    if out and rng.random() < 0.15:
        out.append(rng.choice(out))
    if rng.random() < 0.5:
        rng.shuffle(out)
    sentences = [fact_sentence(f) for f in out]
    if rng.random() < 0.1:
        garbage = " ".join(rng.choices(task_words(), k=rng.randint(1, 6))) + " ."
        sentences.insert(rng.randint(0, len(sentences)), garbage)
    text = " ".join(sentences)
    if text and rng.random() < 0.1:  # cut mid-sentence, as a response hitting max_new_tokens is
        words = text.split()
        text = " ".join(words[: rng.randint(1, len(words))])
    return text


def preference_pairs(
    samples: Sequence[Mapping[str, Any]], objective: str, rng: random.Random
) -> list[tuple[Mapping[str, Any], str, str]]:
    """(sample, chosen, rejected) pairs: two candidates per document, ordered by the rule reward `objective`.

    Ties (equal rule rewards) are dropped: they carry no preference.
    """
    reward = {"complete": CompleteReward(), "faithful": FaithfulReward()}[objective]
    pairs = []
    for sample in samples:
        a, b = perturbed_summary(rng, sample["facts"]), perturbed_summary(rng, sample["facts"])
        ra, rb = reward([sample, sample], [a, b]).tolist()
        if abs(ra - rb) > 1e-9:
            pairs.append((sample, a, b) if ra > rb else (sample, b, a))
    return pairs


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of −log σ(s_c − s_r) over pairs; chosen, rejected: Tensor[B] scores. Returns a scalar."""
    return -F.logsigmoid(chosen - rejected).mean()


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _scores(model: Any, tokenizer: Any, spec: Mapping[str, Any], samples: Sequence[Mapping[str, Any]],
            responses: Sequence[str]) -> torch.Tensor:
    """Reward-model scores Tensor[B] with the spec's input format and label convention."""
    fields_ = [{**s, "response": r} for s, r in zip(samples, responses, strict=True)]
    first = [spec["text"].format_map(f) for f in fields_]
    second = [spec["text_pair"].format_map(f) for f in fields_] if spec["text_pair"] else None
    enc = tokenizer(first, second, padding=True, truncation=True, max_length=256, return_tensors="pt")
    return label_score(model(**enc).logits, spec["label"], spec["minus_label"])


def train_reward_model(
    objective: str, cfg: RewardModelConfig, *, show_progress: bool = True
) -> tuple[Any, Any, dict[str, Any]]:
    """Trains the tiny reward model of `objective` ("complete" or "faithful").

    Returns:
        (model, tokenizer, info) with info holding the held-out pairwise accuracy and the loss curve.
    """
    if objective not in RM_SPECS:
        raise SoupsError(f"reward model: unknown objective {objective!r}; valid: {', '.join(RM_SPECS)}")
    spec = RM_SPECS[objective]
    seed_everything(cfg.seed)
    tokenizer = build_reward_tokenizer()
    model = build_reward_classifier(cfg, len(tokenizer), spec["num_labels"], tokenizer.pad_token_id)
    data = FactsSummaryConfig(seed=cfg.seed)
    rng = random.Random(f"reward_model/{objective}/{cfg.seed}")
    train = preference_pairs(generate_facts_summary(data, cfg.n_docs, "rm_train"), objective, rng)
    held_out = preference_pairs(generate_facts_summary(data, cfg.n_eval_docs, "rm_eval"), objective, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(cfg.steps), desc=f"reward model {objective}", disable=bar_disabled(show_progress), leave=False):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = [train[i] for i in idx]
        samples = [s for s, _, _ in batch]
        scores = _scores(model, tokenizer, spec, samples + samples, [c for _, c, _ in batch] + [r for _, _, r in batch])
        loss = bradley_terry_loss(scores[: len(batch)], scores[len(batch) :])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(held_out), 128):
            batch = held_out[start : start + 128]
            samples = [s for s, _, _ in batch]
            scores = _scores(model, tokenizer, spec, samples + samples,
                             [c for _, c, _ in batch] + [r for _, _, r in batch])
            correct += int((scores[: len(batch)] > scores[len(batch) :]).sum())
    info = {
        "objective": objective, "settings": asdict(cfg), "n_train_pairs": len(train), "n_eval_pairs": len(held_out),
        "eval_pair_accuracy": correct / max(len(held_out), 1), "final_loss": losses[-1] if losses else None,
        "loss_curve": losses[:: max(1, len(losses) // 40)],
        "reward": {k: spec[k] for k in ("label", "minus_label", "text", "text_pair")},
    }  # fmt: skip
    return model, tokenizer, info


def ensure_reward_models(
    output_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    smoke: bool = False,
    overrides: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Path]:
    """Builds (if missing) the tiny `complete` and `faithful` reward models and returns their directories.

    Idempotent: an existing directory with its `reward_info.json` is reused (after checking it was built with
    the same settings). Each model directory is written atomically.

    Args:
        output_dir: Parent directory; default `<cache>/facts_summary_rm/seed<seed>[-smoke]`.
        seed: Seeds the candidates, the pairs, the init and the batch order.
        smoke: A seconds-long build for tests (fewer steps and pairs).
        overrides: Fields of `RewardModelConfig` to change.
        show_progress: Draw tqdm bars.

    Returns:
        {"complete": dir, "faithful": dir}; each loads with `AutoModelForSequenceClassification.from_pretrained`.
    """
    cfg = RewardModelConfig(seed=seed)
    if smoke:
        cfg.n_docs, cfg.n_eval_docs, cfg.steps = 256, 64, 30
    for key, value in dict(overrides or {}).items():
        if not hasattr(cfg, key):
            raise SoupsError(f"reward models: unknown setting {key!r}; valid: {', '.join(f.name for f in fields(cfg))}")
        setattr(cfg, key, value)
    if output_dir is None:
        output_dir = default_cache_dir() / "facts_summary_rm" / f"seed{seed}{'-smoke' if smoke else ''}"
    paths: dict[str, Path] = {}
    for objective in RM_SPECS:
        target = Path(output_dir) / objective
        info_path = target / INFO_FILE
        if info_path.exists():
            built = json.loads(info_path.read_text()).get("settings")
            if built != asdict(cfg):
                raise SoupsError(f"reward models: {target} was built with other settings {built}; remove it or pick "
                                 "another dir")
        else:
            model, tokenizer, info = train_reward_model(objective, cfg, show_progress=show_progress)
            try:
                with atomic_dir(target) as tmp:
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
                    write_json(tmp / INFO_FILE, info)
            except SoupsError:
                if not info_path.exists():  # another process finished the same build first
                    raise
        paths[objective] = target
    return paths


def read_reward_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The scoring convention saved beside a tiny reward model: label, minus_label, text, text_pair."""
    info_path = Path(path) / INFO_FILE
    if not info_path.exists():
        raise SoupsError(f"{path} has no {INFO_FILE}; build it with rl.text.reward_models.ensure_reward_models")
    return dict(json.loads(info_path.read_text())["reward"])


@REWARDS.register("embedded_reward_model")
def embedded_reward_model(
    which: str,
    *,
    dir: str | None = None,  # noqa: A002 - the config key
    seed: int = 0,
    smoke: bool = False,
    batch_size: int = 64,
    device: str = "auto",
    name: str | None = None,
) -> ModelReward:
    """A tiny reward model of the embedded task, built on first use if missing, then loaded by path through
    `ModelReward`, the same code a Hub reward model goes through. Registered here, not in `rl.text.rewards` (which
    names this module in `REWARD_MODULES`), so that the rule rewards do not import the models built on them.

    Args:
        which: "complete" or "faithful".
        dir: Parent directory of the built models; default `<cache>/facts_summary_rm/seed<seed>[-smoke]`.
        seed, smoke: Build settings (see `ensure_reward_models`).
        batch_size, device: Scoring settings.
        name: Objective name for messages.
    """
    if which not in RM_SPECS:
        raise SoupsError(f"embedded_reward_model: which={which!r}; valid: {', '.join(RM_SPECS)}")
    path = ensure_reward_models(dir, seed=seed, smoke=smoke)[which]
    spec = read_reward_spec(path)
    return ModelReward(str(path), **spec, batch_size=batch_size, device=device, name=name or which)
