"""README.md stays true to the repository: its two commands are what CI runs, and what it links to exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _first_bash_block_after(heading: str) -> list[str]:
    section = README.split(f"\n## {heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_two_newcomer_commands() -> None:
    assert _first_bash_block_after("Quickstart") == ['python3 -m pip install -e ".[rl]" && python3 -m soups.quickstart']
    (tests_command,) = _first_bash_block_after("Tests")
    install, run = (part.strip() for part in tests_command.split("&&"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    # .ci/run installs the same extras (quietly) and runs exactly the README's test command
    assert '".[dev]"' in install
    assert any(line.startswith("python3 -m pip install") and '".[dev]"' in line for line in ci)
    assert run in ci


def test_linked_images_and_named_scripts_exist() -> None:
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert images, "the README shows its fronts"
    scripts = set(re.findall(r"(?<![\w/])((?:tests/)?(?:benchmarks|rl|vision|soups|evals)/[\w/]+\.py)\b", README))
    assert len(scripts) >= 10
    missing = [p for p in [*images, *sorted(scripts)] if not (ROOT / p).is_file()]
    assert not missing, missing


def test_named_experiment_presets_exist() -> None:
    # `python <entry> experiment=NAME` (or `-m soups.<entry>`) -> configs/<entry>/experiment/NAME.yaml
    entries = {"rl/train_ppo.py": "train_ppo", "vision/train.py": "vision_train", "vision/sweep.py": "vision_sweep",
               "vision/average.py": "vision_average", "vision/train_ensemble.py": "train_ensemble",
               "soups.mix": "mix", "soups.pareto": "pareto", "soups.quickstart": "quickstart"}  # fmt: skip
    found = re.findall(r"(rl/train_ppo\.py|vision/\w+\.py|soups\.\w+)\b[^\n`]*?\bexperiment=(\w+)", README)
    assert len(found) >= 8
    missing = [(e, n) for e, n in found if e in entries
               and not (ROOT / "configs" / entries[e] / "experiment" / f"{n}.yaml").is_file()]  # fmt: skip
    assert not missing, missing
