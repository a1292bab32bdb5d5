"""LoRA PPO for causal LMs: one rewarded-soups expert (or a MORL baseline) per run.

    accelerate launch rl/train_ppo.py reward=faithful          # the embedded offline task, CPU, minutes
    python rl/train_ppo.py experiment=smoke                     # < 1 minute, for tests
    accelerate launch --config_file configs/accelerate/ddp.yaml rl/train_ppo.py experiment=reuters_llama7b

Each step: sample prompts, generate responses (length drawn from [min, max]), score them with EVERY
configured objective (logged), scalarise (one objective, or MORL Σ μ_i R_i), add a per-token KL penalty to
the reference policy (the same model with its adapter disabled), compute GAE advantages, and run several
epochs of clipped PPO updates on mini-batches of the adapter and the value head. Outputs under
`output_dir` (default `outputs/train_ppo/<reward.optimize>-<seed>/`):

    checkpoints/step-XXXXXX/   adapter, value head, optimizer, scheduler, RNG states, KL/normaliser state
    adapter/                   the final PEFT adapter (+ tokenizer, value_head.safetensors, config.yaml)
    metrics.jsonl              one row per step: every objective's batch mean + PPO statistics
    tensorboard/               the same through accelerate's trackers

Only what is PPO is here (rollouts, losses, the loop; maths in `rl/ppo.py`); checkpoints, exact resume, metrics
and the non-finite guards are the trainer runtime's (`rl/runtime.py`). The loop is written here rather than taken
from trl because trl's PPOTrainer now lives in `trl.experimental` and is removed after 1.12; it also takes a
single reward model, while a run here logs a reward vector and resumes exactly from its checkpoints.
"""

from __future__ import annotations

from soups.cli import entry, precheck

precheck(__name__, __file__, "../configs/train_ppo")  # a bad command line fails here, before the heavy imports

import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rl import ppo, runtime
from rl.runtime import latest_checkpoint, rng_state, set_rng_state
from rl.text.models import ActorCritic, adapter_state, build_policy, load_adapter_weights, load_tokenizer
from soups.utils import SoupsError, atomic_dir, save_resolved_config, seed_everything, write_json

CONFIG_PATH = "../configs/train_ppo"
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")

__all__ = ["latest_checkpoint", "rng_state", "set_rng_state", "train", "validate_config"]


# ----------------------------------------------------------------------------------------------------------
# Small helpers (pure, tested)
# ----------------------------------------------------------------------------------------------------------


def response_mask(response: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on the response tokens up to and including the first EOS, 0 after it.

    Args:
        response: LongTensor[B, R], generated tokens (anything after EOS is padding).
        eos_token_id: The end-of-sequence id.

    Returns:
        LongTensor[B, R]; e.g. with EOS = 2, [5, 2, 0, 0] -> [1, 1, 0, 0] and [5, 6, 7, 8] -> [1, 1, 1, 1].
    """
    is_eos = (response == eos_token_id).long()
    eos_before = is_eos.cumsum(1) - is_eos  # number of EOS strictly before each position
    return (eos_before == 0).long()


def step_plan(seed: int, step: int, n_prompts: int, count: int, length_range: Sequence[int]) -> tuple[list[int], int]:
    """The prompts and the response length of one step, a pure function of (seed, step).

    Deterministic in the step, not in the RNG state, so a resumed run draws the same prompts.

    Args:
        seed: The run's seed.
        step: The 0-based PPO step.
        n_prompts: Size of the training prompt pool.
        count: Prompts needed this step (all processes).
        length_range: [min, max] new tokens; the length is uniform in it, inclusive (same for the batch).

    Returns:
        (prompt indices of length `count`, response length).
    """
    lo, hi = int(length_range[0]), int(length_range[1])
    if not 1 <= lo <= hi:
        raise SoupsError(f"generation.response_length={list(length_range)} must be [min, max] with 1 <= min <= max")
    if n_prompts < 1:
        raise SoupsError("the task has no training prompt")
    rng = np.random.default_rng([seed, step])
    indices = rng.choice(n_prompts, size=count, replace=count > n_prompts).tolist()
    return [int(i) for i in indices], int(rng.integers(lo, hi + 1))


def check_ppo_settings(cfg: Mapping[str, Any]) -> int:
    """Validates the `ppo` node; returns the number of mini-batches per epoch.

    Raises:
        SoupsError: a non-positive size, a batch that mini-batches do not divide, or gradient accumulation
            that does not divide the mini-batches of an epoch.
    """
    batch, mini, accum = int(cfg["batch_size"]), int(cfg["mini_batch_size"]), int(cfg["grad_accum_steps"])
    if min(batch, mini, accum, int(cfg["epochs"])) < 1 or int(cfg["steps"]) < 0:
        raise SoupsError(f"ppo: batch_size={batch}, mini_batch_size={mini}, grad_accum_steps={accum}, "
                         f"epochs={cfg['epochs']} must be >= 1 and steps={cfg['steps']} >= 0")
    if batch % mini:
        raise SoupsError(f"ppo.batch_size={batch} is not a multiple of ppo.mini_batch_size={mini}")
    if (batch // mini) % accum:
        raise SoupsError(f"ppo.grad_accum_steps={accum} must divide the {batch // mini} mini-batches of an epoch")
    return batch // mini


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> int:
    """Checks every numeric and named setting up front (before anything is built); returns the number of
    mini-batches per epoch.

    Raises:
        SoupsError: naming the key, its value and the valid range or options (e.g. `ppo.lr=-1 must be a finite
            number in (0, inf)`).
    """
    num, choice = runtime.check_number, runtime.check_choice
    choice("mixed_precision", cfg["mixed_precision"], MIXED_PRECISION)
    num("seed", cfg["seed"], low=0, integer=True)
    p, g, kl, ck = cfg["ppo"], cfg["generation"], cfg["kl"], cfg["checkpoint"]
    for key in ("batch_size", "mini_batch_size", "grad_accum_steps", "epochs"):
        num(f"ppo.{key}", p[key], low=1, integer=True)
    num("ppo.steps", p["steps"], low=0, integer=True)
    num("ppo.lr", p["lr"], low=0, low_open=True)
    choice("ppo.scheduler", p["scheduler"], ("constant", "linear", "cosine"))
    for key in ("weight_decay", "vf_coef", "ent_coef", "max_grad_norm"):
        num(f"ppo.{key}", p[key], low=0)
    for key in ("clip_range", "clip_range_value"):
        num(f"ppo.{key}", p[key], low=0, low_open=True)
    for key in ("gamma", "lam"):
        num(f"ppo.{key}", p[key], low=0, high=1)
    choice("kl.controller", kl["controller"], ("adaptive", "fixed"))
    choice("kl.estimator", kl["estimator"], ppo.KL_ESTIMATORS)
    num("kl.init_coef", kl["init_coef"], low=0)
    num("kl.target", kl["target"], low=0, low_open=True)
    num("kl.horizon", kl["horizon"], low=0, low_open=True)
    num("generation.temperature", g["temperature"], low=0, low_open=True)
    num("generation.top_k", g["top_k"], low=0, integer=True)
    num("generation.top_p", g["top_p"], low=0, high=1, low_open=True)
    num("generation.min_new_tokens", g["min_new_tokens"], low=0, integer=True)
    step_plan(0, 0, 1, 1, g["response_length"])  # raises on a bad [min, max]
    num("checkpoint.every", ck["every"], low=0, integer=True)
    num("checkpoint.keep", ck["keep"], low=0, integer=True)
    num("value_head.dropout", cfg["value_head"]["dropout"], low=0, high=1, high_open=True)
    return check_ppo_settings(p)


def build_kl_controller(cfg: Mapping[str, Any]) -> ppo.FixedKLController:
    """`kl.controller`: fixed (constant β) or adaptive (Ziegler et al., target KL and horizon)."""
    kind = str(cfg.get("controller", "fixed"))
    if kind == "fixed":
        return ppo.FixedKLController(float(cfg["init_coef"]))
    if kind == "adaptive":
        return ppo.AdaptiveKLController(float(cfg["init_coef"]), float(cfg["target"]), float(cfg["horizon"]))
    raise SoupsError(f"unknown kl.controller {kind!r}; valid names: adaptive, fixed")


def build_optimizer(params: list[torch.nn.Parameter], cfg: Mapping[str, Any], total_steps: int) -> tuple[Any, Any]:
    """AdamW and a per-PPO-step LR schedule (`constant`, `linear` or `cosine` decay from `ppo.lr`)."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg.get("weight_decay", 0.0)))
    name = str(cfg.get("scheduler", "constant"))
    if name not in ("constant", "linear", "cosine"):
        raise SoupsError(f"unknown ppo.scheduler {name!r}; valid names: constant, cosine, linear")
    return opt, get_scheduler(name, opt, num_warmup_steps=0, num_training_steps=max(total_steps, 1))


# ----------------------------------------------------------------------------------------------------------
# Forward passes
# ----------------------------------------------------------------------------------------------------------


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float,
    with_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probabilities (and values, entropies) of the response tokens of query+response sequences.

    Args:
        model: An `ActorCritic` (possibly wrapped by DDP/DeepSpeed).
        input_ids: LongTensor[B, P + R], left-padded prompts then responses.
        attention_mask: LongTensor[B, P + R].
        prompt_len: P.
        temperature: The sampling temperature (logits are divided by it, as when sampling).
        with_values: Run the value head.

    Returns:
        logprobs [B, R], values [B, R] (V of the state before each response token, or None), entropy [B, R].
    """
    logits, values = model(input_ids, attention_mask, with_values=with_values)
    logits = logits[:, prompt_len - 1 : -1] / temperature
    logprobs = ppo.logprobs_from_logits(logits, input_ids[:, prompt_len:])
    entropy = ppo.entropy_from_logits(logits.detach())
    if values is not None:
        values = values[:, prompt_len - 1 : -1]
    return logprobs, values, entropy


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: the PPO contents (layout, atomicity and validation are the runtime's)
# ----------------------------------------------------------------------------------------------------------


def any_process(accelerator: Any, flag: bool) -> bool:
    """Whether `flag` holds on any process (every process gets the same answer)."""
    return bool(accelerator.gather(torch.tensor([float(flag)], device=accelerator.device)).sum().item() > 0)


def nonfinite_training_state(model: ActorCritic, optimizer: Any) -> list[str]:
    """Names of the trainable weights and optimizer-state tensors of this process that hold NaN or inf."""
    weights = {n: prm for n, prm in model.named_parameters() if prm.requires_grad}
    return runtime.nonfinite({"weights": weights, "optimizer": optimizer.state_dict()["state"]})


def save_checkpoint(
    root: Path, step: int, *, accelerator: Any, model: ActorCritic, tokenizer: Any, optimizer: Any, scheduler: Any,
    state: dict[str, Any], cfg: DictConfig,
) -> Path:  # fmt: skip
    """Writes `root/step-XXXXXX` through `runtime.save_checkpoint`: every rank stages its RNG and optimizer state,
    then rank 0 writes the adapter, value head, scheduler and state, and renames the directory into place.

    Raises:
        SoupsError: a weight or optimizer tensor of any process is not finite; nothing is written and the error
            names the last good checkpoint.
    """
    bad = nonfinite_training_state(model, optimizer)
    if any_process(accelerator, bool(bad)):
        what = ", ".join(bad[:3]) or "another process's weights or optimizer state"
        raise runtime.stop_error(root, step, f"non-finite {what} (lower ppo.lr={cfg.ppo.lr}); not saving "
                                 f"{runtime.checkpoint_dir(root, step).name}")
    staging = root / f".staging-{runtime.checkpoint_dir(root, step).name}"
    if accelerator.is_main_process:
        staging.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    torch.save(rng_state(), staging / f"rng_rank{rank}.pt")
    torch.save(optimizer.state_dict(), staging / f"optimizer_rank{rank}.pt")  # ZeRO shards it per process
    accelerator.wait_for_everyone()
    target = runtime.checkpoint_dir(root, step)
    if accelerator.is_main_process:

        def write_files(tmp: Path) -> None:
            model.policy.save_pretrained(tmp / "adapter")
            tokenizer.save_pretrained(tmp / "adapter")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for path in staging.glob("*_rank*.pt"):
                shutil.move(str(path), tmp / path.name)

        try:
            runtime.save_checkpoint(root, step, state=state, arrays={"value_head": model.v_head.state_dict()},
                                    write_files=write_files, config=cfg)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(
    path: Path, *, accelerator: Any, model: ActorCritic, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Restores adapter, value head, this rank's optimizer and RNG, the scheduler; returns trainer_state.json."""
    load_adapter_weights(model.policy, path / "adapter")
    model.v_head.load_state_dict(runtime.load_arrays(path / "value_head.safetensors", framework="pt"))
    rank = accelerator.process_index
    rng_path, opt_path = path / f"rng_rank{rank}.pt", path / f"optimizer_rank{rank}.pt"
    if not rng_path.exists() or not opt_path.exists():
        raise SoupsError(f"{path} has no RNG/optimizer state for process {rank}; resume with the same number of "
                         "processes")
    optimizer.load_state_dict(torch.load(opt_path, weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    state = runtime.load_state(path)
    set_rng_state(torch.load(rng_path, weights_only=True))
    return state


def find_resume_checkpoint(root: Path, accelerator: Any) -> Path | None:
    """The newest valid checkpoint under `root`; newer broken ones are named in a warning and set aside."""
    good, broken = runtime.newest_valid_checkpoint(root, runtime.check_torch_file)
    accelerator.wait_for_everyone()  # every process validated the same files before any is renamed
    if accelerator.is_main_process:
        for path, why in broken:
            moved = runtime.set_aside(path)
            warnings.warn(f"checkpoint {path} is broken ({why}); set aside as {moved.name}, resuming from "
                          f"{good if good is not None else 'the start'}", RuntimeWarning, stacklevel=2)
    accelerator.wait_for_everyone()
    return good


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def train(cfg: DictConfig, *, reward_set: Any = None, task: Any = None) -> Path:
    """Runs PPO as configured and returns the final adapter directory.

    Args:
        cfg: The composed `train_ppo` config.
        reward_set: Overrides the reward set built from `cfg.reward` (tests inject fakes): an object with
            `.names`, `__call__(samples, responses, check=False) -> Tensor[B, K]`, `.scalar(Tensor[B, K]) ->
            Tensor[B]`, `state_dict()` and `load_state_dict()`.
        task: Overrides the task built from `cfg.task`: an object with `.train`, a list of dicts with "prompt".
    """
    from accelerate import Accelerator

    from rl.text.sft import ensure_sft_init
    from rl.text.task import build_task

    # ---- set-up: config, accelerator, output dir, seed --------------------------------------------------
    n_minibatches = validate_config(cfg)
    p, g = cfg.ppo, cfg.generation
    out = Path(cfg.output_dir).absolute()
    ckpt_root, final_dir, metrics_path = out / "checkpoints", out / "adapter", out / "metrics.jsonl"
    accelerator = Accelerator(
        # without CUDA, cpu=True lets torchrun form a gloo group of CPU processes (DDP on CPU; `accelerate launch`
        # starts one process on a GPU-less machine unless run under MPI); with CUDA, the launcher's backend is used
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=int(p.grad_accum_steps),
        mixed_precision=_mixed_precision(str(cfg.mixed_precision)),
        log_with=list(cfg.logging.log_with) or None,
        project_dir=str(out),
    )
    if not cfg.resume:
        runtime.prepare_run_dir(out, [ckpt_root, final_dir, out / "tensorboard", metrics_path], resume=False,
                                overwrite=bool(cfg.overwrite), is_main=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    resume_from = find_resume_checkpoint(ckpt_root, accelerator) if cfg.resume else None
    seed_everything(int(cfg.seed) + accelerator.process_index)

    # ---- set-up: task, rewards, policy, optimizer -------------------------------------------------------
    task = task if task is not None else build_task(cfg.task)
    prompts_pool = list(task.train)
    reward_set = reward_set if reward_set is not None else runtime.build_reward_set(cfg.reward)
    names = list(reward_set.names)
    name_or_path = cfg.model.name_or_path
    if not name_or_path:  # the embedded task's SFT init, built once (rank 0 first, the others reuse it)
        # Building it draws random numbers; restore the run's RNG afterwards, so the LoRA init and every rollout
        # are the same whether the init was just built or found in the cache.
        state_before_sft = rng_state()
        with accelerator.main_process_first():
            sft_cfg = OmegaConf.to_container(cfg.model.sft, resolve=True)
            name_or_path = str(ensure_sft_init(sft_cfg.get("dir"), seed=int(sft_cfg.get("seed", 0)),
                                               smoke=bool(sft_cfg.get("smoke", False)),
                                               overrides=sft_cfg.get("overrides") or None,
                                               show_progress=accelerator.is_main_process))
        set_rng_state(state_before_sft)
    tokenizer = load_tokenizer(str(name_or_path), bool(cfg.model.trust_remote_code))
    model = ActorCritic(build_policy(cfg.model, cfg.lora, str(name_or_path)), float(cfg.value_head.dropout))
    if p.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    base_names = {n for n, prm in model.named_parameters() if not prm.requires_grad}
    trainable = [prm for prm in model.parameters() if prm.requires_grad]
    optimizer, scheduler = build_optimizer(trainable, p, int(p.steps))
    kl_ctl = build_kl_controller(cfg.kl)
    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator=accelerator, model=model, optimizer=optimizer,
                                scheduler=scheduler)
        start_step = int(state["step"])
        kl_ctl.load_state_dict(state["kl_controller"])
        reward_set.load_state_dict({k: torch.tensor(v) for k, v in state.get("reward_normalizer", {}).items()})
        accelerator.print(f"resuming from {resume_from} (step {start_step})")
    elif cfg.resume:
        accelerator.print(f"resume=true but no valid checkpoint under {ckpt_root}: starting from step 0")
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: ActorCritic = accelerator.unwrap_model(model)
    device = accelerator.device
    if hasattr(reward_set, "to"):
        reward_set.to(device if device.type == "cuda" else "cpu")

    # ---- set-up: logging --------------------------------------------------------------------------------
    runtime.start_trackers(accelerator, cfg, list(cfg.logging.log_with))
    if accelerator.is_main_process:
        save_resolved_config(cfg, out)
        runtime.truncate_metrics(metrics_path, start_step)

    # ---- loop ---------------------------------------------------------------------------------------------
    world, rank, bsz = accelerator.num_processes, accelerator.process_index, int(p.batch_size)
    total = int(p.steps)
    bar = runtime.progress(start_step, total, desc="ppo",
                           enabled=accelerator.is_main_process and bool(cfg.logging.progress_bar))
    gen_kwargs = {
        "do_sample": True, "temperature": float(g.temperature), "top_k": int(g.top_k), "top_p": float(g.top_p),
        "min_new_tokens": int(g.min_new_tokens), "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }  # fmt: skip
    for step in bar:
        # -- rollout
        t0 = time.perf_counter()
        indices, length = step_plan(int(cfg.seed), step, len(prompts_pool), bsz * world, g.response_length)
        samples = [prompts_pool[i] for i in indices[rank * bsz : (rank + 1) * bsz]]
        enc = tokenizer([s["prompt"] for s in samples], return_tensors="pt", padding=True,
                        add_special_tokens=bool(g.add_special_tokens)).to(device)
        unwrapped.eval()
        with torch.no_grad():
            try:
                sequences = unwrapped.policy.generate(**enc, max_new_tokens=length, **gen_kwargs)
            except RuntimeError as err:  # finite but huge weights overflow the logits; sampling then refuses
                if "inf" not in str(err) and "nan" not in str(err):
                    raise
                raise runtime.stop_error(ckpt_root, step + 1, f"sampling failed on non-finite logits ({err}); "
                                         f"lower ppo.lr={p.lr}") from err
        P = enc["input_ids"].shape[1]
        response = sequences[:, P:]
        mask = response_mask(response, tokenizer.eos_token_id)
        attention = torch.cat([enc["attention_mask"], mask], dim=1)
        texts = tokenizer.batch_decode(response.masked_fill(mask == 0, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
        gen_seconds = time.perf_counter() - t0

        # -- rewards: every objective, checked on all processes at once, then scalarised
        raw = reward_set(samples, texts, check=False).to(torch.float32)
        all_raw = accelerator.gather(raw.to(device)).cpu()
        try:
            runtime.check_finite(all_raw, names)
        except SoupsError as err:
            raise runtime.stop_error(ckpt_root, step + 1, str(err)) from err
        scores = reward_set.scalar(all_raw)[rank * bsz : (rank + 1) * bsz].to(device)

        # -- old log-probs, values, reference log-probs (adapter disabled), KL-shaped rewards, GAE
        with torch.no_grad():
            old_logprobs, old_values, _ = response_logprobs(model, sequences, attention, P, float(g.temperature))
            with unwrapped.policy.disable_adapter():
                ref_logprobs, _, _ = response_logprobs(model, sequences, attention, P, float(g.temperature),
                                                       with_values=False)
            kl = ppo.kl_penalty(old_logprobs, ref_logprobs, str(cfg.kl.estimator))
            rewards, non_score = ppo.token_rewards(scores, kl, mask, kl_ctl.value)
            advantages, returns = ppo.gae(rewards, old_values, mask, float(p.gamma), float(p.lam))
            if p.whiten_advantages:
                advantages = ppo.masked_whiten(advantages, mask)

        # -- PPO epochs over shuffled mini-batches, with gradient accumulation and clipping
        t1 = time.perf_counter()
        unwrapped.train()
        stats: dict[str, list[float]] = {}
        mini = bsz // n_minibatches
        for _ in range(int(p.epochs)):
            order = torch.randperm(bsz)
            for m in range(n_minibatches):
                idx = order[m * mini : (m + 1) * mini].to(device)
                with accelerator.accumulate(model):
                    logprobs, values, entropy = response_logprobs(model, sequences[idx], attention[idx], P,
                                                                  float(g.temperature))
                    pg = ppo.clipped_policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx],
                                                 float(p.clip_range))
                    vf_loss, vf_clipfrac = ppo.clipped_value_loss(values, old_values[idx], returns[idx], mask[idx],
                                                                  float(p.clip_range_value))
                    ent = ppo.masked_mean(entropy, mask[idx])
                    loss = pg.loss + float(p.vf_coef) * vf_loss - float(p.ent_coef) * ent
                    if not torch.isfinite(loss):
                        raise runtime.stop_error(ckpt_root, step + 1, f"the PPO loss is {loss.item()} (policy "
                                                 f"{pg.loss.item()}, value {vf_loss.item()}); lower ppo.lr={p.lr}")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and float(p.max_grad_norm) > 0:
                        grad_norm = accelerator.clip_grad_norm_(trainable, float(p.max_grad_norm))
                        if grad_norm is not None:  # DeepSpeed clips inside its engine and returns None
                            _append(stats, "ppo/grad_norm", float(grad_norm))
                    try:
                        optimizer.step()
                    except RuntimeError as err:  # AdamW's step size lr / (1 - β1^t) overflows float32 for huge lr
                        if "overflow" not in str(err):
                            raise
                        raise runtime.stop_error(ckpt_root, step + 1, f"the optimizer step overflowed ({err}); "
                                                 f"lower ppo.lr={p.lr}") from err
                    optimizer.zero_grad(set_to_none=True)
                for key, value in (("ppo/loss_policy", pg.loss), ("ppo/loss_value", vf_loss), ("ppo/loss", loss),
                                   ("ppo/clipfrac", pg.clipfrac), ("ppo/vf_clipfrac", vf_clipfrac),
                                   ("ppo/approx_kl", pg.approx_kl), ("ppo/ratio", pg.ratio_mean),
                                   ("ppo/entropy", ent)):
                    _append(stats, key, float(value.detach()))
        scheduler.step()
        ppo_seconds = time.perf_counter() - t1
        # A finite loss can still take a non-finite step (an inf gradient norm, an overflowing update): stop here,
        # before the next rollout samples from NaN logits or a checkpoint could be attempted.
        bad = runtime.nonfinite({n: prm for n, prm in unwrapped.named_parameters() if prm.requires_grad})
        if any_process(accelerator, bool(bad)):
            raise runtime.stop_error(ckpt_root, step + 1, f"the update made {', '.join(bad[:3]) or 'weights'} "
                                     f"non-finite; lower ppo.lr={p.lr}")

        # -- KL controller, metrics
        seq_kl = accelerator.gather((kl * mask).sum(1)).mean().item()
        lr = scheduler.get_last_lr()[0]
        kl_coef = kl_ctl.value
        kl_ctl.update(seq_kl, bsz * world)
        gen_tokens = accelerator.gather(mask.sum().reshape(1)).sum().item()
        all_scores = accelerator.gather(scores)
        metrics: dict[str, float] = {f"objective/{n}": float(all_raw[:, k].mean()) for k, n in enumerate(names)}
        metrics.update({
            "reward/scalar": float(all_scores.mean()),
            "reward/non_score": accelerator.gather(non_score.sum(1)).mean().item(),
            "kl/seq": seq_kl, "kl/coef": kl_coef, "lr": lr,
            "response/length": gen_tokens / (bsz * world), "response/max_new_tokens": float(length),
            "values/mean": accelerator.gather(ppo.masked_mean(old_values, mask).reshape(1)).mean().item(),
            "returns/mean": accelerator.gather(ppo.masked_mean(returns, mask).reshape(1)).mean().item(),
            "time/rollout_s": gen_seconds, "time/ppo_s": ppo_seconds,
            "perf/gen_tokens_per_s": gen_tokens / max(gen_seconds, 1e-9),
            "perf/samples_per_s": bsz * world / max(time.perf_counter() - t0, 1e-9),
        })  # fmt: skip
        metrics.update({k: float(np.mean(v)) for k, v in stats.items()})
        if cfg.logging.log_with:
            accelerator.log(metrics, step=step + 1)
        if accelerator.is_main_process:
            runtime.append_metrics(metrics_path, {"step": step + 1, "samples": (step + 1) * bsz * world, **metrics})
        bar.set_postfix({n: f"{metrics[f'objective/{n}']:.3f}" for n in names} | {"kl": f"{seq_kl:.3f}"})

        # -- checkpoint every k steps (and at the end)
        every = int(cfg.checkpoint.every)
        if (every > 0 and (step + 1) % every == 0) or step + 1 == total:
            state = {
                "step": step + 1, "kl_controller": kl_ctl.state_dict(),
                "reward_normalizer": {k: v.tolist() for k, v in reward_set.state_dict().items()},
                "objectives": names, "seed": int(cfg.seed), "num_processes": world,
            }  # fmt: skip
            save_checkpoint(ckpt_root, step + 1, accelerator=accelerator, model=unwrapped, tokenizer=tokenizer,
                            optimizer=optimizer, scheduler=scheduler, state=state, cfg=cfg)
            if accelerator.is_main_process:
                runtime.prune_checkpoints(ckpt_root, int(cfg.checkpoint.keep))

    # ---- save: the final adapter (PEFT format) with the resolved config ----------------------------------
    bar.close()
    changed = {n for n, prm in unwrapped.named_parameters() if prm.requires_grad} & base_names
    if changed:  # defensive: nothing outside the adapter/value head may have become trainable
        raise SoupsError(f"base parameters became trainable: {sorted(changed)[:3]}")
    if runtime.nonfinite(adapter_state(unwrapped.policy)):
        raise SoupsError("the adapter has non-finite weights; not saving it (lower ppo.lr)")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(final_dir, overwrite=True) as tmp:
            unwrapped.policy.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            runtime.save_arrays(tmp / "value_head.safetensors", unwrapped.v_head.state_dict())
            save_resolved_config(cfg, tmp)
            write_json(tmp / "train_summary.json", {
                "steps": total, "objectives": names, "optimize": getattr(reward_set, "optimize", None),
                "base_model": str(name_or_path), "kl_controller": kl_ctl.state_dict(), "metrics": str(metrics_path),
            })  # fmt: skip
        accelerator.print(f"final adapter: {final_dir}")
    accelerator.end_training()
    return final_dir


def _append(stats: dict[str, list[float]], key: str, value: float) -> None:
    stats.setdefault(key, []).append(value)


def _mixed_precision(setting: str) -> str | None:
    """`auto`: whatever `accelerate launch` set, else bf16 on a bf16-capable GPU, else no."""
    import os

    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@entry(CONFIG_PATH)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `accelerate launch rl/train_ppo.py reward=faithful`."""
    train(cfg)


if __name__ == "__main__":
    sys.exit(main())
