"""The `captioning` evaluator of `python -m soups.pareto`: corpus caption metrics of the resident captioner.

For a λ, the resident model (any HF image-to-text model; the `Soup` switched its weights) captions held-out
images greedily, and `evals.captioning.CaptionScorer.corpus` scores the captions as the COCO caption evaluation
does (BLEU-1/4, ROUGE-L, METEOR, CIDEr-D by default); each metric's stderr is a bootstrap over images. METEOR
runs in one java process kept for the whole front (every λ), not one per λ.

    python -m soups.pareto evaluator=captioning experts=[A/model,B/model] init=INIT
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from evals.captioning import METRICS, CaptionScorer, CorpusScores
from rl.captioning.models import CaptionModel, decode_captions
from rl.captioning.rewards import REWARDS
from rl.captioning.task import build_caption_task, load_images
from rl.text.evaluator import training_node
from soups.pareto_registry import EVALUATORS, ObjectiveStat
from soups.utils import SoupsError

__all__ = ["CaptioningEvaluator", "build_captioning_evaluator", "greedy_captions"]

DEFAULT_OBJECTIVES = ("bleu1", "bleu4", "rouge", "meteor", "cider")


def greedy_captions(
    model: Any, tokenizer: Any, processor: Any, images: Sequence[Any], *, batch_size: int = 64,
    max_new_tokens: int = 24, device: torch.device | str = "cpu",
) -> list[str]:  # fmt: skip
    """Greedy captions of uint8 images by an HF image-to-text model (deterministic; weights untouched)."""
    helper = CaptionModel(model, tokenizer, processor)
    start = getattr(model.config, "decoder_start_token_id", None)
    eos = int(tokenizer.eos_token_id)
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            pixels = helper.pixels(images[i : i + batch_size], device)
            tokens = model.generate(pixel_values=pixels, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                    decoder_start_token_id=start)  # fmt: skip
            out += decode_captions(tokenizer, tokens[:, 1:], eos)
    return out


class CaptioningEvaluator:
    """Captions `samples` with the resident model and reports corpus metrics with bootstrap stderr.

    Args:
        samples: Held-out samples (dicts with `id`, `refs`, and `image` or `path`).
        objectives: Objective names (keys of `rl.captioning.rewards.REWARDS`, e.g. bleu1, rouge, cider).
        tokenizer: The captioners' tokenizer.
        processor: Their image processor.
        scorer: The caption scorer (kept for the whole front: one METEOR process).
        batch_size: Images per generate call.
        max_new_tokens: Longest caption.
        bootstrap: Bootstrap resamples of the images for the stderr.
        device: Where the resident model lives.
    """

    def __init__(
        self, samples: Sequence[Mapping[str, Any]], objectives: Sequence[str], tokenizer: Any, processor: Any,
        scorer: CaptionScorer, *, batch_size: int = 64, max_new_tokens: int = 24, bootstrap: int = 200,
        device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        self.samples = list(samples)
        self.objectives = list(objectives)
        self.tokenizer, self.processor, self.scorer = tokenizer, processor, scorer
        self.batch_size, self.max_new_tokens, self.bootstrap = batch_size, max_new_tokens, bootstrap
        self.device = device
        self.images = load_images(self.samples)
        self.last_captions: list[str] = []
        self.last_scores: CorpusScores | None = None  # the last evaluate()'s per-image scores (paired tests)

    def evaluate(self, model: torch.nn.Module) -> dict[str, ObjectiveStat]:
        """Every objective's corpus score (mean) and bootstrap stderr over the images."""
        was_training = model.training
        model.eval()
        try:
            captions = greedy_captions(model, self.tokenizer, self.processor, self.images, batch_size=self.batch_size,
                                       max_new_tokens=self.max_new_tokens, device=self.device)  # fmt: skip
        finally:
            model.train(was_training)
        self.last_captions = captions
        ids = [s["id"] for s in self.samples]
        result = self.scorer.corpus(dict(zip(ids, captions)), {s["id"]: s["refs"] for s in self.samples})
        self.last_scores = result
        stderr = result.bootstrap_stderr(self.bootstrap)
        n = len(ids)
        return {name: ObjectiveStat(result.scores[REWARDS[name]], stderr[REWARDS[name]], n) for name in self.objectives}


@EVALUATORS.register("captioning")
def build_captioning_evaluator(
    cfg: Mapping[str, Any], *, experts: Sequence[str], device: torch.device
) -> CaptioningEvaluator:
    """Builds the evaluator from its config node (configs/pareto/evaluator/captioning.yaml)."""
    from omegaconf import OmegaConf
    from transformers import AutoImageProcessor, AutoTokenizer

    node = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    task = build_caption_task(node.get("task") or training_node(experts[0], "task"))
    split = str(node.get("split", "test"))
    samples = task.split(split)
    n_images = node.get("n_images")
    if n_images is not None:
        if int(n_images) > len(samples):
            raise SoupsError(f"evaluator.n_images={n_images} but the {split} split has {len(samples)} images")
        samples = samples[: int(n_images)]
    objectives = [str(o) for o in node.get("objectives") or DEFAULT_OBJECTIVES]
    unknown = [o for o in objectives if o not in REWARDS]
    if unknown:
        raise SoupsError(f"evaluator.objectives: unknown {unknown}; valid: {', '.join(sorted(REWARDS))}")
    metrics = sorted({REWARDS[o] for o in objectives}, key=METRICS.index)
    scorer = CaptionScorer(metrics, tokenizer=str(node.get("tokenizer", "ptb")), java=str(node.get("java", "java")))
    source = str(node.get("processor") or experts[0])
    if not Path(source).exists() and source == experts[0]:
        raise SoupsError(f"expert {source} not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise SoupsError(f"cannot load the tokenizer/image processor from {source}: {err}; set "
                         "evaluator.processor=<captioner dir or id>") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return CaptioningEvaluator(samples, objectives, tokenizer, processor, scorer,
                               batch_size=int(node.get("batch_size", 64)),
                               max_new_tokens=int(node.get("max_new_tokens", 24)),
                               bootstrap=int(node.get("bootstrap", 200)), device=device)  # fmt: skip
