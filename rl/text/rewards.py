"""Rewards for RLHF: rule rewards of the embedded task, HF reward models, scalarisation and normalisation.

A `RewardSet` computes ALL configured objectives on every batch (a `Tensor[B, K]` of raw rewards, logged so
training trajectories can be drawn in objective space) and scalarises them into the one reward PPO
optimises: a single objective (an expert, one-hot weights μ) or the MORL baseline Σ_i μ_i R_i.

Objectives are picked by name from `REWARDS`:
- `complete` / `faithful`: rule rewards of the embedded `facts_summary` task (see `rl.text.task`). They are in
  tension by design, as completeness and faithfulness reward models are in the rewarded-soups paper:
  `complete` credits every (entity, relation) slot of a document entity the summary addresses (1 when the
  stated fact is true, `partial_credit` when it is made up or wrong), so stating more is rewarded even
  beyond the document; `faithful` is the precision of the statements minus a penalty per wrong, made-up or
  malformed statement, so every extra statement is a risk. Completeness pushes longer summaries, and
  faithfulness shorter, safer ones.
- `reward_model`: any HF `AutoModelForSequenceClassification` (Hub id or path), scored as the logit of one
  label or the difference of two labels, with a per-model input template (e.g. summary + document as a text
  pair for the faithfulness detector).
- `embedded_reward_model`: a tiny reward model of the embedded task, trained on the rule rewards; registered by
  `rl.text.reward_models`, which `REWARD_MODULES` names so it is imported on first use.

The rule rewards are written here (not taken from a library) because they read the task's own fact triples;
the running normaliser is a few lines of Welford/Chan updates, kept here so its state resumes exactly.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rl.text.task import parse_statements
from soups.registry import Registry
from soups.utils import SoupsError

__all__ = [
    "REWARDS",
    "REWARD_MODULES",
    "ModelReward",
    "RewardSet",
    "RunningNormalizer",
    "StatementCounts",
    "build_reward_set",
    "check_finite",
    "completeness_score",
    "count_statements",
    "faithfulness_score",
    "get_reward",
    "scalarize",
]


class RewardFn(Protocol):
    """A reward: one float per (sample, response) pair."""

    def __call__(self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> torch.Tensor: ...


REWARDS: Registry[Callable[..., RewardFn]] = Registry("reward")
# Rewards registered by other modules, imported by name when first asked for. `rl.text.reward_models` trains its tiny
# models on the rule rewards below, so it imports this module; naming it here (data) instead of importing it
# keeps the dependency one-directional.
REWARD_MODULES: dict[str, str] = {"embedded_reward_model": "rl.text.reward_models"}


# ----------------------------------------------------------------------------------------------------------
# Rule rewards of the embedded task (pure functions)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatementCounts:
    """What a response states about a document, statement by statement.

    Attributes:
        n_statements: Non-empty sentences (including malformed ones and repeats).
        supported: Distinct statements that are facts of the document.
        contradicted: Distinct statements about a stated (entity, relation) slot with a wrong value.
        unsupported: Distinct statements about a document entity's relation the document does not state.
        foreign: Distinct well-formed statements about an entity absent from the document.
        malformed: Sentences that are not a fact template (garbage, truncated sentences).
        repeated: Well-formed statements repeating an earlier one word for word.
        slots_true: Distinct (entity, relation) slots of document entities stated with the true value.
        slots_other: Distinct slots of document entities stated only with a wrong or made-up value.
    """

    n_statements: int
    supported: int
    contradicted: int
    unsupported: int
    foreign: int
    malformed: int
    repeated: int
    slots_true: int
    slots_other: int


def count_statements(facts: Sequence[Sequence[str]], response: str) -> StatementCounts:
    """Parses `response` into statements and classifies each against the document's facts.

    Args:
        facts: The document's (entity, relation, value) triples.
        response: The generated summary (any text; garbage is counted as malformed).

    Returns:
        The counts (see `StatementCounts`).
    """
    truth = {(e, r): v for e, r, v in facts}
    doc_entities = {e for e, _, _ in facts}
    seen: set[tuple[str, str, str]] = set()
    supported = contradicted = unsupported = foreign = malformed = repeated = 0
    slots: dict[tuple[str, str], bool] = {}  # slot -> stated with the true value at least once
    statements = parse_statements(response)
    for statement in statements:
        if statement is None:
            malformed += 1
            continue
        if statement in seen:
            repeated += 1
            continue
        seen.add(statement)
        entity, relation, value = statement
        if entity not in doc_entities:
            foreign += 1
            continue
        slot = (entity, relation)
        if slot in truth:
            ok = truth[slot] == value
            supported += ok
            contradicted += not ok
        else:
            ok = False
            unsupported += 1
        slots[slot] = slots.get(slot, False) or ok
    return StatementCounts(
        n_statements=len(statements), supported=supported, contradicted=contradicted, unsupported=unsupported,
        foreign=foreign, malformed=malformed, repeated=repeated,
        slots_true=sum(slots.values()), slots_other=sum(not v for v in slots.values()),
    )  # fmt: skip


def completeness_score(counts: StatementCounts, n_facts: int, partial_credit: float = 0.5) -> float:
    """Completeness: how much of the document's entities the summary covers, per document fact.

    complete = (slots_true + partial_credit · slots_other) / n_facts

    A slot is an (entity, relation) pair of a document entity. A true statement earns 1; a wrong or made-up
    value earns `partial_credit` (the summary looks informative, as a completeness judge sees it). So the
    maximum, 1 + partial_credit · (free slots) / n_facts, needs statements the document does not support:
    this is the pressure that puts completeness in tension with faithfulness.

    Args:
        counts: From `count_statements`.
        n_facts: Number of facts in the document (> 0).
        partial_credit: Credit of a slot stated only with a wrong or unsupported value, in [0, 1].
    """
    if n_facts <= 0:
        raise SoupsError(f"complete reward: a document needs at least one fact, got n_facts={n_facts}")
    return (counts.slots_true + partial_credit * counts.slots_other) / n_facts


def faithfulness_score(counts: StatementCounts, penalty: float = 1.0) -> float:
    """Faithfulness: precision of the statements minus a penalty for everything unsupported.

    faithful = (supported − penalty · (contradicted + unsupported + foreign + malformed)) / max(n_statements, 1)

    Repeats count in the denominator only (redundant, not false). An empty response scores 0: it states
    nothing supported. Range [−penalty, 1].

    Args:
        counts: From `count_statements`.
        penalty: Weight of each wrong, made-up, foreign or malformed statement (≥ 0).
    """
    bad = counts.contradicted + counts.unsupported + counts.foreign + counts.malformed
    return (counts.supported - penalty * bad) / max(counts.n_statements, 1)


def _facts_of(sample: Mapping[str, Any], index: int, reward: str) -> list[Sequence[str]]:
    if "facts" not in sample:
        raise SoupsError(f"reward {reward!r} needs sample['facts'] (the facts_summary task); sample {index} has keys "
                         f"{sorted(sample)}")
    return list(sample["facts"])


def _check_batch(samples: Sequence[Mapping[str, Any]], responses: Sequence[str], reward: str) -> None:
    if len(samples) != len(responses):
        raise SoupsError(f"reward {reward!r}: {len(samples)} samples but {len(responses)} responses")


class CompleteReward:
    """The `complete` rule reward (see `completeness_score`)."""

    def __init__(self, partial_credit: float = 0.5) -> None:
        if not 0.0 <= partial_credit <= 1.0:
            raise SoupsError(f"complete reward: partial_credit={partial_credit} must lie in [0, 1]")
        self.partial_credit = float(partial_credit)

    def __call__(self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> torch.Tensor:
        """Returns Tensor[B] (float32)."""
        _check_batch(samples, responses, "complete")
        out = []
        for i, (sample, response) in enumerate(zip(samples, responses, strict=True)):
            facts = _facts_of(sample, i, "complete")
            out.append(completeness_score(count_statements(facts, response), len(facts), self.partial_credit))
        return torch.tensor(out, dtype=torch.float32)


class FaithfulReward:
    """The `faithful` rule reward (see `faithfulness_score`)."""

    def __init__(self, penalty: float = 1.0) -> None:
        if not penalty >= 0.0:
            raise SoupsError(f"faithful reward: penalty={penalty} must be >= 0")
        self.penalty = float(penalty)

    def __call__(self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> torch.Tensor:
        """Returns Tensor[B] (float32)."""
        _check_batch(samples, responses, "faithful")
        out = []
        for i, (sample, response) in enumerate(zip(samples, responses, strict=True)):
            out.append(faithfulness_score(count_statements(_facts_of(sample, i, "faithful"), response), self.penalty))
        return torch.tensor(out, dtype=torch.float32)


REWARDS.add("complete", CompleteReward)
REWARDS.add("faithful", FaithfulReward)


# ----------------------------------------------------------------------------------------------------------
# Reward models (HF sequence classifiers)
# ----------------------------------------------------------------------------------------------------------


def format_template(template: str, sample: Mapping[str, Any], response: str, *, what: str) -> str:
    """Fills `template` (str.format) with the sample's fields and `{response}`.

    Raises:
        SoupsError: The template names a field the sample does not have.
    """
    fields = {**sample, "response": response}
    try:
        return template.format_map(fields)
    except KeyError as err:
        raise SoupsError(f"{what}: template {template!r} uses {err} but the sample has only {sorted(fields)}") from err


def label_score(logits: torch.Tensor, label: int, minus_label: int | None = None) -> torch.Tensor:
    """The reward read from classifier logits: logit[label], or logit[label] − logit[minus_label].

    Args:
        logits: Tensor[B, C] classifier logits.
        label: Index of the rewarded label.
        minus_label: Optional index subtracted (e.g. faithful − hallucinated for the faithfulness detector).

    Returns:
        Tensor[B].
    """
    score = logits[:, label]
    if minus_label is not None:
        score = score - logits[:, minus_label]
    return score


class ModelReward:
    """A reward from an HF sequence-classification model, loaded from a Hub id or a local path.

    Args:
        model: Hub id or directory of an `AutoModelForSequenceClassification` (with its tokenizer).
        label: The rewarded label: an index or a label name from the model's `config.label2id`.
        minus_label: Optional label subtracted from it (label difference), index or name.
        text: Template of the first text (str.format over the sample's fields and `{response}`).
        text_pair: Optional template of the second text of a pair (e.g. "{document}").
        batch_size: Responses per forward pass.
        max_length: Truncation length in tokens (the pair is truncated "longest first").
        device: "auto" (CUDA when present), "cpu", "cuda:0", ...
        dtype: Optional torch dtype name for the weights ("float16", "bfloat16"); default float32.
        trust_remote_code: Passed to `from_pretrained`; only when the model needs it and you trust it.
        revision: Optional Hub revision.
        name: Name used in error messages.
    """

    def __init__(
        self,
        model: str,
        *,
        label: int | str = 0,
        minus_label: int | str | None = None,
        text: str = "{response}",
        text_pair: str | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        device: str = "auto",
        dtype: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        name: str = "reward_model",
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise SoupsError(f"reward {name!r}: batch_size={batch_size} must be >= 1")
        self.name, self.path = name, str(model)
        self.text, self.text_pair = text, text_pair
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        kwargs: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code), "revision": revision}
        if dtype is not None:
            if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
                raise SoupsError(f"reward {name!r}: unknown dtype {dtype!r}")
            kwargs["dtype"] = getattr(torch, str(dtype))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=bool(trust_remote_code),
                                                           revision=revision)
            self.model = AutoModelForSequenceClassification.from_pretrained(self.path, **kwargs)
        except OSError as err:
            raise SoupsError(f"reward {name!r}: cannot load reward model {self.path!r}: {' '.join(str(err).split())}") \
                from err
        if self.tokenizer.pad_token is None:  # GPT-2-style reward models ship no pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label = self._label_index(label)
        self.minus_label = None if minus_label is None else self._label_index(minus_label)
        self.model.eval().requires_grad_(False)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.to(device)

    def _label_index(self, label: int | str) -> int:
        config = self.model.config
        n = int(config.num_labels)
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            mapping = {str(k): int(v) for k, v in (config.label2id or {}).items()}
            if label not in mapping:
                raise SoupsError(f"reward {self.name!r}: {self.path} has no label {label!r}; labels: {sorted(mapping)}")
            return mapping[label]
        index = int(label)
        if not 0 <= index < n:
            raise SoupsError(f"reward {self.name!r}: label {index} out of range for {self.path} ({n} labels)")
        return index

    def to(self, device: str | torch.device) -> ModelReward:
        """Moves the reward model to `device`."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def format(
        self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str]
    ) -> tuple[list[str], list[str] | None]:
        """The classifier inputs: first texts and, for pair models, second texts."""
        what = f"reward {self.name!r}"
        first = [format_template(self.text, s, r, what=what) for s, r in zip(samples, responses, strict=True)]
        if self.text_pair is None:
            return first, None
        second = [format_template(self.text_pair, s, r, what=what) for s, r in zip(samples, responses, strict=True)]
        return first, second

    @torch.no_grad()
    def __call__(self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> torch.Tensor:
        """Scores B responses in batches; returns Tensor[B] (float32, on CPU)."""
        _check_batch(samples, responses, self.name)
        first, second = self.format(samples, responses)
        out = []
        for start in range(0, len(first), self.batch_size):
            stop = start + self.batch_size
            enc = self.tokenizer(
                first[start:stop], second[start:stop] if second is not None else None, padding=True,
                truncation=True, max_length=self.max_length, return_tensors="pt",
            ).to(self.device)  # fmt: skip
            logits = self.model(**enc).logits.float()
            out.append(label_score(logits, self.label, self.minus_label).cpu())
        return torch.cat(out) if out else torch.zeros(0)


REWARDS.add("reward_model", ModelReward)


# ----------------------------------------------------------------------------------------------------------
# Checks, scalarisation, normalisation
# ----------------------------------------------------------------------------------------------------------


def check_finite(rewards: torch.Tensor, names: Sequence[str]) -> None:
    """Raises if any reward is NaN or infinite, naming the objective and the first bad response.

    Args:
        rewards: Tensor[B, K] raw rewards.
        names: The K objective names.

    Raises:
        SoupsError: e.g. "reward 'faithful' returned nan for 2 of 8 responses (first: response 3)".
    """
    if rewards.ndim != 2 or rewards.shape[1] != len(names):
        raise SoupsError(f"rewards of shape {tuple(rewards.shape)} do not match the {len(names)} objectives "
                         f"{list(names)}")
    bad = ~torch.isfinite(rewards)
    for k, name in enumerate(names):
        rows = bad[:, k].nonzero().flatten()
        if len(rows):
            first = int(rows[0])
            raise SoupsError(f"reward {name!r} returned {rewards[first, k].item()} for {len(rows)} of "
                             f"{rewards.shape[0]} responses (first: response {first})")


def scalarize(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The MORL scalarisation Σ_i μ_i R_i (an expert is a one-hot μ).

    Args:
        rewards: Tensor[B, K].
        weights: Tensor[K].

    Returns:
        Tensor[B].
    """
    if rewards.ndim != 2 or weights.shape != (rewards.shape[1],):
        raise SoupsError(f"scalarize: rewards {tuple(rewards.shape)} and weights {tuple(weights.shape)} do not match")
    return rewards @ weights.to(rewards.dtype).to(rewards.device)


class RunningNormalizer:
    """Per-objective running mean and standard deviation (Welford, batched with Chan et al.'s merge).

    `normalize(x)` returns (x − mean) / max(std, eps) with the population std of everything seen so far.
    The state (count, mean, M2) is kept in float64 and round-trips exactly through `state_dict`.

    Args:
        size: Number of objectives K.
        eps: Floor on the standard deviation.
    """

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        self.size, self.eps = int(size), float(eps)
        self.count = 0
        self.mean = torch.zeros(self.size, dtype=torch.float64)
        self.m2 = torch.zeros(self.size, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Adds a batch Tensor[B, K] to the statistics.

        With batch count n_b, mean m_b and M2_b = Σ (x − m_b)², and δ = m_b − m_a:
        n = n_a + n_b, mean = m_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n.
        """
        if x.ndim != 2 or x.shape[1] != self.size:
            raise SoupsError(f"normalizer: expected rewards [B, {self.size}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        x = x.detach().to("cpu", torch.float64)
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta**2 * self.count * n_b / n
        self.count = n

    @property
    def std(self) -> torch.Tensor:
        """Tensor[K] population standard deviation (zeros before any update)."""
        return (self.m2 / max(self.count, 1)).sqrt()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x − mean) / max(std, eps), Tensor[B, K] in x's dtype and device."""
        mean = self.mean.to(x.device, x.dtype)
        std = self.std.clamp_min(self.eps).to(x.device, x.dtype)
        return (x - mean) / std

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so it saves with safetensors or `torch.save` and loads with weights_only=True."""
        return {"count": torch.tensor(self.count, dtype=torch.int64), "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restores a `state_dict` exactly."""
        mean, m2 = state["mean"].to(torch.float64), state["m2"].to(torch.float64)
        if mean.shape != (self.size,) or m2.shape != (self.size,):
            raise SoupsError(f"normalizer: state for {tuple(mean.shape)} objectives, this run has {self.size}")
        self.count, self.mean, self.m2 = int(state["count"]), mean.clone(), m2.clone()


# ----------------------------------------------------------------------------------------------------------
# The reward set
# ----------------------------------------------------------------------------------------------------------


class RewardSet:
    """All objectives of a run and the scalarisation it optimises.

    Args:
        objectives: (name, reward function) pairs, K of them, names unique.
        weights: Tensor[K] scalarisation weights μ (one-hot for an expert).
        optimize: What is optimised: an objective name or "morl".
        normalize: Normalise each objective by its running mean/std before scalarising.
    """

    def __init__(
        self,
        objectives: Sequence[tuple[str, RewardFn]],
        weights: torch.Tensor,
        optimize: str,
        normalize: bool = False,
    ) -> None:
        self.names = [name for name, _ in objectives]
        self.fns = [fn for _, fn in objectives]
        if not self.names:
            raise SoupsError("reward: no objectives configured (reward.objectives is empty)")
        if len(set(self.names)) != len(self.names):
            raise SoupsError(f"reward: objective names must be unique, got {self.names}")
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        if self.weights.shape != (len(self.names),):
            raise SoupsError(f"reward: {len(self.weights)} weights for {len(self.names)} objectives {self.names}")
        self.optimize = optimize
        self.normalizer = RunningNormalizer(len(self.names)) if normalize else None

    def __call__(
        self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str], *, check: bool = True
    ) -> torch.Tensor:
        """Raw rewards of every objective: Tensor[B, K] (float32, CPU).

        Args:
            samples: B task samples (dicts with "prompt" and task fields).
            responses: B generated responses (decoded text, prompt excluded).
            check: Raise `SoupsError` naming the objective when a reward is NaN or infinite.
        """
        if len(samples) != len(responses):
            raise SoupsError(f"reward: {len(samples)} samples but {len(responses)} responses")
        columns = []
        for name, fn in zip(self.names, self.fns, strict=True):
            values = torch.as_tensor(fn(samples, responses), dtype=torch.float32).detach().cpu().flatten()
            if values.shape != (len(responses),):
                raise SoupsError(f"reward {name!r} returned {tuple(values.shape)} values for {len(responses)} "
                                 "responses")
            columns.append(values)
        rewards = torch.stack(columns, dim=1) if responses else torch.zeros(0, len(self.names))
        if check:
            check_finite(rewards, self.names)
        return rewards

    def scalar(self, rewards: torch.Tensor, *, update: bool = True) -> torch.Tensor:
        """The optimised reward Tensor[B] from raw rewards Tensor[B, K] (normalised first if configured).

        Args:
            rewards: Raw rewards from `__call__`.
            update: Update the running normaliser with this batch before normalising (training); set false
                for evaluation.
        """
        if self.normalizer is not None:
            if update:
                self.normalizer.update(rewards)
            rewards = self.normalizer.normalize(rewards)
        return scalarize(rewards, self.weights)

    def to(self, device: str | torch.device) -> RewardSet:
        """Moves model rewards to `device` (rule rewards have nothing to move)."""
        for fn in self.fns:
            if hasattr(fn, "to"):
                fn.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The normaliser's state (empty without normalisation), for exact resume."""
        return self.normalizer.state_dict() if self.normalizer is not None else {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restores `state_dict`."""
        if self.normalizer is not None and state:
            self.normalizer.load_state_dict(state)


def get_reward(kind: str) -> Callable[..., RewardFn]:
    """The reward builder registered as `kind`, importing the module of `REWARD_MODULES` that registers it.

    Raises:
        UnknownNameError: `kind` is not a registered reward (the message lists the valid ones, lazy ones included).
    """
    if kind not in REWARDS:
        # An unknown name imports every lazy module, so the error lists all valid names.
        for module in [REWARD_MODULES[kind]] if kind in REWARD_MODULES else sorted(set(REWARD_MODULES.values())):
            importlib.import_module(module)
    return REWARDS.get(kind)


def build_reward(spec: str | Mapping[str, Any]) -> tuple[str, RewardFn]:
    """One objective from its config: a registry name (`"faithful"`) or a mapping
    `{name: ..., type: <registry name, default = name>, **options}`.

    Raises:
        UnknownNameError: The type is not a registered reward (the message lists the valid ones).
    """
    if isinstance(spec, str):
        return spec, get_reward(spec)()
    options = dict(spec)
    if "name" not in options:
        raise SoupsError(f"reward objective {options} has no 'name'")
    name = str(options.pop("name"))
    kind = str(options.pop("type", name))
    builder = get_reward(kind)
    if kind in ("reward_model", "embedded_reward_model"):
        options.setdefault("name", name)
    try:
        return name, builder(**options)
    except TypeError as err:
        raise SoupsError(f"reward {name!r} ({kind}): bad options {sorted(options)}: {err}") from err


def build_reward_set(cfg: Mapping[str, Any] | Any) -> RewardSet:
    """Builds the run's `RewardSet` from the `reward` config node.

    Keys: `objectives` (list of names or mappings), `optimize` (an objective name, or "morl"), `weights`
    (MORL μ, on the simplex: ≥ 0 and summing to 1; only with optimize=morl), `normalize` (bool).
    """
    data = _to_container(cfg)
    specs = data.get("objectives") or []
    if not specs:
        raise SoupsError("reward.objectives is empty; e.g. objectives: [complete, faithful]")
    objectives = [build_reward(spec) for spec in specs]
    names = [name for name, _ in objectives]
    optimize = str(data.get("optimize", names[0] if len(names) == 1 else ""))
    raw_weights = data.get("weights")
    if optimize == "morl":
        if raw_weights is None:
            raise SoupsError(f"reward.optimize=morl needs reward.weights, one per objective {names}")
        weights = morl_weights(raw_weights, names)
    elif optimize in names:
        if raw_weights is not None:
            raise SoupsError(f"reward.weights={list(raw_weights)} is only used with reward.optimize=morl, "
                             f"not optimize={optimize}")
        weights = torch.zeros(len(names))
        weights[names.index(optimize)] = 1.0
    else:
        raise SoupsError(f"reward.optimize={optimize!r} is not an objective; valid: {', '.join([*names, 'morl'])}")
    return RewardSet(objectives, weights, optimize, normalize=bool(data.get("normalize", False)))


def morl_weights(values: Sequence[float], names: Sequence[str]) -> torch.Tensor:
    """Validates MORL weights μ: one per objective, finite, ≥ 0, summing to 1 (±1e-6). Returns Tensor[K]."""
    weights = [float(v) for v in values]
    if len(weights) != len(names):
        raise SoupsError(f"reward.weights has {len(weights)} values for {len(names)} objectives {list(names)}")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise SoupsError(f"reward.weights={weights} must be >= 0 and sum to 1 (a point of the simplex)")
    return torch.tensor(weights, dtype=torch.float32)


def _to_container(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise SoupsError(f"reward config must be a mapping, got {type(cfg).__name__}")

