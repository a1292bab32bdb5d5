"""The locomotion expert family: Brax PPO policies trading velocity against control cost (thesis §6.3.4).

- `task`: the envs and backends, and the wrapper logging both objectives.
- `rewards`: R_α = velocity − α Σ‖a‖² mapped onto the env's reward kwargs.
- `models`: PPO params <-> flat safetensors (`policy/…`, `value/…`, `normalizer/…`), the torch view a Soup mixes.
- `evaluator`: the `brax` evaluator of `python -m soups.pareto`.

Modules are imported by name (nothing is imported here); all but `rewards` need the `brax` extra.
"""
