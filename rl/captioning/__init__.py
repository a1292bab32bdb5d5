"""The captioning expert family: image captioners fine-tuned by self-critical sequence training (thesis §6.3.2).

- `task`: the embedded procedural scenes (the default, offline) and the Karpathy-split COCO loader.
- `rewards`: the metric rewards (BLEU-1/4, ROUGE-L, METEOR, CIDEr-D; scorers in `evals.captioning`) and SCST's
  loss and baselines.
- `models`: the tiny VisionEncoderDecoder and its word-level tokenizer built offline, and loading any HF
  image-to-text model.
- `evaluator`: the `captioning` evaluator of `python -m soups.pareto`.

Entry point: `rl/train_captioning.py` (`stage=xe` trains the shared init, `stage=scst` an expert or MORL run).
Modules are imported by name (nothing is imported here).
"""
