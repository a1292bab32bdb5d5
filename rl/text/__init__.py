"""The text expert family: RLHF of causal LMs (rewarded soups' summarisation experiments).

- `task`: the embedded `facts_summary` task (the default) and the dataset loaders (`hf_dataset`).
- `rewards`: the reward registry (rule rewards, Hub/local reward models, the MORL scalarisation).
- `reward_models`: the embedded task's tiny reward models (`embedded_reward_model`, registered lazily).
- `models`: the PPO policy (causal LM + LoRA + value head) and the embedded tokenizer and tiny causal LM.
- `sft`: supervised fine-tuning and the shared init (`ensure_sft_init`).
- `evaluator`: the `text` evaluator of `python -m soups.pareto` and `evaluate_policy`.
- `quickstart`: the `summarisation` recipe of `python -m soups.quickstart`.

Modules are imported by name (nothing is imported here), so `import rl.text.quickstart` stays light.
"""
