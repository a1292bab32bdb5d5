"""The diffusion expert family: text-to-image models fine-tuned by reward-weighted regression (thesis §6.3.3).

- `task`: the embedded procedural scenes (coloured shapes on backgrounds, captioned; offline, deterministic) and
  prompt files.
- `models`: the tiny Stable-Diffusion-layout pipeline built from configs (UNet, CLIP text encoder with a tokenizer
  built offline, single-block VAE, DDIM), its pre-training into the shared init, loading any diffusers pipeline,
  and the trainable parameters (`lora`, `difffit`).
- `rewards`: the image rewards (embedded: colourfulness, prompt fidelity; Hub: ava, cafe, pickscore, clipscore).
- `evaluator`: the `diffusion` evaluator of `python -m soups.pareto`.

Entry point: `rl/train_diffusion.py`. Modules are imported by name (nothing is imported here).
"""
