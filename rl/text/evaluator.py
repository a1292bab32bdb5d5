"""Text evaluation: the `text` evaluator of `python -m soups.pareto`, and `evaluate_policy` for one policy.

`build_text_evaluator` (registered as `text` in `soups.pareto_registry.EVALUATORS`) builds, once, the task's
evaluation prompts (`rl.text.task.build_task`), the reward set (`rl.text.rewards.build_reward_set`) and the
tokenizer.
`TextEvaluator.evaluate(model)` then decodes a response for each prompt with the resident model and returns,
per objective, the mean reward, its standard error and the number of prompts.

Why a decoding loop of our own (`ensemble_generate`) instead of `model.generate`: the functional-ensemble
baseline (thesis Fig. 6.4(c)) decodes from Σ_i λ_i logits_i of N experts, which `generate` cannot do with one
KV cache per expert; and a soup point and an ensemble point must be decoded by the SAME code so their rewards
are comparable. A soup is the one-member case (λ = [1]); the tests check that it reproduces `generate`
token for token under greedy decoding. Sampling uses transformers' own temperature/top-k/top-p warpers.

When the evaluator config leaves `task`/`reward` null, they are read from the first expert's training config
(`config.yaml` saved by `rl/train_ppo.py` beside the adapter or in its run dir), so a front is scored on the
rewards its experts were trained on.

`TextEvaluator.evaluate_batched(batch)` scores K λ of a LoRA soup at once (`soups.soup.Soup.batched`): every
prompt batch is repeated λ-major to K × batch_size rows and decoded by the same loop, each row at its own λ. With
greedy decoding the responses, hence the scores, equal K calls of `evaluate` (the tests check it).

`evaluate_policy` scores one policy through `model.generate` (any HF causal LM, a `PeftModel`, a model whose
weights a `Soup` switches in place) and returns each objective's mean, standard error and count with the
generated texts; the tests check the evaluator against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rl.text.rewards import RewardSet, build_reward_set
from rl.text.task import build_task
from soups.cli import bar_disabled
from soups.pareto_registry import EVALUATORS, ObjectiveStat, check_experts
from soups.pareto_registry import mean_stderr as objective_stat
from soups.utils import SoupsError

# A decoding member: (input_ids [B, T], attention_mask [B, S], position_ids [B, T], past) -> (logits [B, T, V], past)
Member = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]

# ---------------------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------------------


def mix_logits(logits: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    """The functional ensemble's next-token logits Σ_i λ_i z_i, accumulated in float32.

    Args:
        logits: N tensors of shape [B, V], one per expert.
        lambdas: N weights (a point of the simplex for an interpolation of the ensemble).

    Returns:
        Shape [B, V], float32.

    Raises:
        SoupsError: the number of weights differs from the number of experts, or shapes differ.
    """
    if len(logits) != len(lambdas) or not logits:
        raise SoupsError(f"ensemble has {len(logits)} members but {len(lambdas)} weights")
    shape = logits[0].shape
    out = torch.zeros(shape, dtype=torch.float32, device=logits[0].device)
    for i, (z, lam) in enumerate(zip(logits, lambdas)):
        if z.shape != shape:
            raise SoupsError(f"ensemble member {i} gives logits of shape {list(z.shape)}, member 0 {list(shape)}")
        out += float(lam) * z.float()
    return out


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token, pads clamped to 0.

    Args:
        attention_mask: Shape [B, T], 1 for tokens and 0 for (left) padding.

    Returns:
        Shape [B, T], long. E.g. mask [0, 0, 1, 1] -> cumsum − 1 = [−1, −1, 0, 1] -> [0, 0, 0, 1].
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class DecodeSettings:
    """How responses are decoded (see configs/pareto/evaluator/text.yaml)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def _warpers(settings: DecodeSettings) -> Any:
    """transformers' logits warpers for sampling (temperature, top-k, top-p), in generate's order."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    return warpers


@torch.no_grad()
def ensemble_generate(
    members: Sequence[Member],
    lambdas: Sequence[float],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: DecodeSettings,
    *,
    eos_token_id: int,
    pad_token_id: int,
) -> torch.Tensor:
    """Decodes from the λ-weighted logits of `members`, each with its own KV cache.

    One member with λ = [1] is plain decoding of that model (greedy: identical to `generate`).

    Args:
        members: N decoding callables (see `Member`).
        lambdas: N weights.
        input_ids: Shape [B, T], left-padded prompts.
        attention_mask: Shape [B, T].
        settings: Decoding settings; sampling draws from torch's global RNG (seed it before calling).
        eos_token_id: Ends a response; later positions are filled with `pad_token_id`.
        pad_token_id: Filler after the end of a response.

    Returns:
        Shape [B, L], L ≤ max_new_tokens: the new tokens only.
    """
    if settings.max_new_tokens < 1:
        raise SoupsError(f"max_new_tokens={settings.max_new_tokens} must be ≥ 1")
    warpers = _warpers(settings) if settings.do_sample else None
    mask = attention_mask.clone()
    positions = positions_from_mask(mask)
    step_ids = input_ids
    pasts: list[Any] = [None] * len(members)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    generated = []
    for _ in range(settings.max_new_tokens):
        step_logits = []
        for m, member in enumerate(members):
            logits, pasts[m] = member(step_ids, mask, positions, pasts[m])
            step_logits.append(logits[:, -1, :])
        scores = mix_logits(step_logits, lambdas)  # [B, V]
        if warpers is not None:
            context = torch.cat([input_ids, *generated], dim=1) if generated else input_ids
            probs = torch.softmax(warpers(context, scores), dim=-1)
            token = torch.multinomial(probs, 1).squeeze(1)
        else:
            token = scores.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        generated.append(token[:, None])
        done |= token == eos_token_id
        if bool(done.all()):
            break
        step_ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    return torch.cat(generated, dim=1)


def model_member(model: torch.nn.Module, adapter: str | None = None) -> Member:
    """A decoding member backed by an HF causal LM (optionally a named adapter of a `PeftModel`)."""
    import inspect

    # Recent transformers call the KV cache `cache` (argument and output) and deprecate `past_key_values`,
    # warning on every use; older ones (down to our minimum, 4.45) only know `past_key_values`.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def member(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        if adapter is not None:
            model.set_adapter(adapter)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{name: past})
        return out.logits, out[name]

    return member


# ---------------------------------------------------------------------------------------------------------------
# Building blocks read from the experts
# ---------------------------------------------------------------------------------------------------------------


def find_training_config(expert: str | Path) -> Path | None:
    """The resolved training `config.yaml` of an expert: in its dir, or in the run dir above it."""
    path = Path(expert)
    for directory in (path, path.parent, path.parent.parent):
        candidate = directory / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def training_node(expert: str | Path, key: str) -> dict[str, Any]:
    """The `key` node (e.g. `task`, `reward`) of an expert's training config.

    Raises:
        SoupsError: no training config, or it has no such node.
    """
    from omegaconf import OmegaConf

    path = find_training_config(expert)
    if path is None:
        raise SoupsError(f"evaluator.{key} is null and {expert} has no training config.yaml beside it or above it; "
                         f"set evaluator.{key}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(cfg, dict) or cfg.get(key) is None:
        raise SoupsError(f"{path} has no `{key}` node; set evaluator.{key}")
    return cfg[key]


def load_tokenizer(name: str | None, experts: Sequence[str], base: str | None) -> Any:
    """The tokenizer from `name`, else the first expert's dir, else the base model; left padding, a pad token."""
    from transformers import AutoTokenizer

    candidates = [name] if name else [p for p in (experts[0], base) if p]
    errors = []
    for candidate in candidates:
        if not name and Path(candidate).is_dir() and not (Path(candidate) / "tokenizer_config.json").is_file():
            errors.append(f"{candidate}: no tokenizer_config.json")
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(candidate)
        except (OSError, ValueError) as err:
            errors.append(f"{candidate}: {' '.join(str(err).split())[:200]}")
            continue
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    raise SoupsError("cannot load a tokenizer for the text evaluator (set evaluator.tokenizer): " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------------------------


class TextEvaluator:
    """Scores a causal LM on a fixed set of prompts with every reward of a reward set.

    Attributes:
        objectives: The reward names, in the reward set's order.
    """

    def __init__(
        self,
        samples: Sequence[Mapping[str, Any]],
        reward_set: Any,
        tokenizer: Any,
        settings: DecodeSettings,
        *,
        batch_size: int,
        experts: Sequence[str] = (),
        base: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not samples:
            raise SoupsError("the text evaluator has no prompts (task eval split is empty or n_prompts=0)")
        if batch_size < 1:
            raise SoupsError(f"evaluator.batch_size={batch_size} must be ≥ 1")
        self.samples = list(samples)
        self.reward_set = reward_set
        self.tokenizer = tokenizer
        self.settings = settings
        self.batch_size = batch_size
        self.objectives = list(reward_set.names)
        self.experts = list(experts)
        self.base = base
        self.device = torch.device(device)
        self._ensemble: tuple[Any, list[Member]] | None = None

    def responses(self, members: Sequence[Member], lambdas: Sequence[float], device: torch.device,
                  copies: int = 1) -> list[str]:
        """Decodes one response per prompt from the λ-weighted members.

        Args:
            members: The decoding members.
            lambdas: Their weights.
            device: Where the prompts go.
            copies: K > 1 repeats every prompt batch K times, λ-major (`Soup.batched` rows), and returns the
                K responses of each prompt block after block: response k·n + i is copy k of prompt i.
        """
        out: list[list[str]] = [[] for _ in range(copies)]
        starts = range(0, len(self.samples), self.batch_size)
        for start in tqdm(starts, desc="decode", leave=False, disable=len(starts) < 4):
            batch = self.samples[start : start + self.batch_size]
            prompts = [str(s["prompt"]) for s in batch]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            ids, mask = (enc[k].repeat(copies, 1).to(device) for k in ("input_ids", "attention_mask"))
            new = ensemble_generate(
                members, lambdas, ids, mask, self.settings,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            )  # fmt: skip
            texts = [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
            for k in range(copies):
                out[k] += texts[k * len(batch) : (k + 1) * len(batch)]
        return [text for block in out for text in block]

    def score(self, responses: Sequence[str]) -> dict[str, ObjectiveStat]:
        """Every reward's mean, stderr and n over the prompts."""
        rewards = torch.as_tensor(self.reward_set(self.samples, list(responses)))  # [B, K]
        if rewards.shape != (len(self.samples), len(self.objectives)):
            raise SoupsError(f"reward set returned shape {list(rewards.shape)}, expected "
                             f"[{len(self.samples)}, {len(self.objectives)}]")
        return {name: objective_stat(rewards[:, k]) for k, name in enumerate(self.objectives)}

    def evaluate(self, model: torch.nn.Module) -> dict[str, ObjectiveStat]:
        """Scores `model` (weights untouched) on every objective."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            responses = self.responses([model_member(model)], [1.0], device)
        finally:
            model.train(was_training)
        return self.score(responses)

    def evaluate_batched(self, batch: Any) -> list[dict[str, ObjectiveStat]]:
        """Scores the K λ of a `soups.soup.BatchedSoup` in one decoding pass per prompt batch (K × batch_size
        rows); element k equals `evaluate` of the soup set to λ_k (greedy decoding).

        Raises:
            SoupsError: sampling (`do_sample=true`): the K λ would not draw the same random numbers as K
                separate evaluations, which the front's common-random-numbers comparison relies on.
        """
        if self.settings.do_sample:
            raise SoupsError("grid.batch_lambdas > 1 needs greedy decoding (evaluator.do_sample=false): sampled λ "
                             "points would not share the per-λ random numbers; set grid.batch_lambdas=1")
        model, k = batch.model, len(batch)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            responses = self.responses([model_member(model)], [1.0], device, copies=k)
        finally:
            model.train(was_training)
        n = len(self.samples)
        return [self.score(responses[i * n : (i + 1) * n]) for i in range(k)]

    def evaluate_ensemble(self, lambdas: Sequence[float]) -> dict[str, ObjectiveStat]:
        """Scores the functional ensemble Σ_i λ_i logits_i of the experts (loaded once, on first call)."""
        if len(lambdas) != len(self.experts):
            raise SoupsError(f"ensemble weights {list(lambdas)} do not match the {len(self.experts)} experts")
        if self._ensemble is None:
            self._ensemble = load_ensemble(self.experts, self.base, self.device)
        _, members = self._ensemble
        return self.score(self.responses(members, lambdas, self.device))


def load_ensemble(experts: Sequence[str], base: str | None, device: torch.device) -> tuple[Any, list[Member]]:
    """Loads the experts for the functional ensemble: adapters as named adapters on ONE base, or full models.

    Returns:
        (what holds the weights, one decoding member per expert).
    """
    from soups.checkpoint import open_checkpoint

    if open_checkpoint(experts[0]).kind == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if base is None:
            raise SoupsError(f"adapter {experts[0]} names no base model; set base_model=...")
        model = AutoModelForCausalLM.from_pretrained(base).to(device)
        model = PeftModel.from_pretrained(model, experts[0], adapter_name="expert0")
        for i, path in enumerate(experts[1:], start=1):
            model.load_adapter(path, adapter_name=f"expert{i}")
        model.eval()
        return model, [model_member(model, f"expert{i}") for i in range(len(experts))]
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(path).to(device).eval() for path in experts]
    return models, [model_member(m) for m in models]


# ---------------------------------------------------------------------------------------------------------------
# One policy through `model.generate`
# ---------------------------------------------------------------------------------------------------------------


def mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean, s / √n with the sample standard deviation s (ddof = 1).

    Args:
        values: Tensor[N], N ≥ 1.

    Returns:
        (mean, stderr); the stderr of a single value is 0.0 (nothing to estimate it from).
    """
    n = values.numel()
    if n == 0:
        raise SoupsError("mean_stderr: no values")
    x = values.detach().double().flatten()
    mean = float(x.mean())
    if n == 1:
        return mean, 0.0
    return mean, float(x.std(unbiased=True)) / math.sqrt(n)


def summarize_rewards(rewards: torch.Tensor, names: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Per-objective summary of raw rewards.

    Args:
        rewards: Tensor[N, K].
        names: K objective names.

    Returns:
        {name: {"mean": float, "stderr": float, "n": int}} in objective order.
    """
    if rewards.ndim != 2 or rewards.shape[1] != len(names):
        raise SoupsError(f"summarize_rewards: rewards {tuple(rewards.shape)} do not match objectives {list(names)}")
    out: dict[str, dict[str, float | int]] = {}
    for k, name in enumerate(names):
        mean, stderr = mean_stderr(rewards[:, k])
        out[name] = {"mean": mean, "stderr": stderr, "n": int(rewards.shape[0])}
    return out


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
    show_progress: bool = False,
) -> list[str]:
    """Decodes a response per prompt (prompt tokens removed, special tokens skipped).

    Prompts are tokenised without special tokens and left-padded, so every row's response starts at the
    same column. Sampling draws from torch's global generator (seed it, or use `evaluate_policy`).

    Args:
        model: An HF causal LM (or PeftModel) with `generate`.
        tokenizer: Its tokenizer (a pad token is required; eos is used as pad when missing).
        prompts: N prompt strings.
        max_new_tokens: Response length cap.
        do_sample: Sample instead of greedy decoding.
        temperature, top_k, top_p: Sampling settings (ignored when greedy).
        batch_size: Prompts per `generate` call.
        show_progress: Draw a tqdm bar over batches.

    Returns:
        N response strings.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise SoupsError(f"generate: max_new_tokens={max_new_tokens} and batch_size={batch_size} must be >= 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SoupsError("generate: the tokenizer has neither a pad nor an eos token")
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "pad_token_id": pad_id,
                              "eos_token_id": tokenizer.eos_token_id, "do_sample": bool(do_sample)}
    if do_sample:
        kwargs.update(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    else:  # do not let a checkpoint's generation_config turn greedy decoding into sampling
        kwargs.update(temperature=None, top_k=None, top_p=None)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generate", disable=bar_disabled(show_progress), leave=False):
            batch = list(prompts[start : start + batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Mapping[str, Any]],
    reward_set: RewardSet,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Generates a response per sample and scores it with every objective of `reward_set`.

    Deterministic: greedy decoding is; sampling runs under a forked RNG seeded with `seed`, so the caller's
    random state is left untouched and the same seed gives the same texts.

    Args:
        model: An HF causal LM (or PeftModel).
        tokenizer: Its tokenizer.
        samples: N task samples with "prompt" (and the fields the rewards read).
        reward_set: The objectives (all are computed; NaN rewards raise `SoupsError` naming the objective).
        max_new_tokens, do_sample, temperature, top_k, top_p, batch_size: Decoding settings.
        seed: Seed of the sampling RNG.
        show_progress: Draw a tqdm bar over generation batches.

    Returns:
        {"objectives": {name: {"mean", "stderr", "n"}}, "names": [K names], "texts": [N responses],
         "rewards": [N lists of K floats], "decoding": {settings and seed}}.
    """
    if not samples:
        raise SoupsError("evaluate_policy: no samples to evaluate")
    prompts = []
    for i, sample in enumerate(samples):
        if "prompt" not in sample:
            raise SoupsError(f"evaluate_policy: sample {i} has no 'prompt' (keys: {sorted(sample)})")
        prompts.append(str(sample["prompt"]))
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        texts = generate_responses(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, batch_size=batch_size, show_progress=show_progress,
        )  # fmt: skip
    rewards = reward_set(samples, texts)
    return {
        "objectives": summarize_rewards(rewards, reward_set.names),
        "names": list(reward_set.names),
        "texts": texts,
        "rewards": rewards.tolist(),
        "decoding": {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample),
                     "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p), "seed": int(seed)},
    }


@EVALUATORS.register("text")
def build_text_evaluator(cfg: Mapping[str, Any], *, experts: Sequence[str], device: torch.device) -> TextEvaluator:
    """Builds the text evaluator from its config node (configs/pareto/evaluator/text.yaml)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    task_cfg = node.get("task") or training_node(experts[0], "task")
    reward_cfg = node.get("reward") or training_node(experts[0], "reward")
    task = build_task(task_cfg)
    n_prompts = int(node.get("n_prompts", 64))
    if n_prompts > len(task.eval):
        raise SoupsError(f"evaluator.n_prompts={n_prompts} but task {task.name!r} has {len(task.eval)} eval prompts")
    reward_set = build_reward_set(OmegaConf.create(reward_cfg))
    base = node.get("base_model") or check_experts(experts)["base"]
    tokenizer = load_tokenizer(node.get("tokenizer"), experts, base)
    settings = DecodeSettings(**{f.name: node[f.name] for f in fields(DecodeSettings) if node.get(f.name) is not None})
    batch_size = int(node.get("batch_size", 32))
    return TextEvaluator(
        task.eval[:n_prompts], reward_set, tokenizer, settings, batch_size=batch_size, experts=experts, base=base,
        device=device,
    )  # fmt: skip
