"""README.md and docs/ stay true to the repository: the two commands are what CI runs, every docs page is linked
from the front page, and every link, image, script and experiment preset they name exists."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README_PATH, *DOCS]
ALL_TEXT = "\n".join(p.read_text() for p in PAGES)

# `python <entry> experiment=NAME` (or `-m soups.<entry>`) -> configs/<entry>/experiment/NAME.yaml
ENTRIES = {"rl/train_ppo.py": "train_ppo", "vision/train.py": "vision_train", "vision/sweep.py": "vision_sweep",
           "vision/average.py": "vision_average", "vision/train_ensemble.py": "train_ensemble",
           "soups.mix": "mix", "soups.pareto": "pareto", "soups.quickstart": "quickstart",
           "soups.serve": "serve", "rl/train_captioning.py": "train_captioning",
           "rl/train_brax.py": "train_brax", "rl/train_diffusion.py": "train_diffusion"}  # fmt: skip


def _first_bash_block_after(heading: str) -> list[str]:
    section = README.split(f"\n## {heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (letters of any script, digits, `_`,
    `-` and spaces kept), spaces to hyphens."""
    text = heading.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a '# comment' in a code block is no heading
    return {github_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_github_slug_hand_worked() -> None:
    assert github_slug("Benchmark table (M = 4, RotatedDigits, CPU)") == "benchmark-table-m--4-rotateddigits-cpu"
    slug = github_slug("λ switch: resident Soup vs rebuilding from disk")
    assert slug == "λ-switch-resident-soup-vs-rebuilding-from-disk"
    slug = github_slug("Training RLHF experts: LoRA PPO (`rl/train_ppo.py`)")
    assert slug == "training-rlhf-experts-lora-ppo-rltrain_ppopy"


def test_the_two_newcomer_commands() -> None:
    assert _first_bash_block_after("Quickstart") == ['python3 -m pip install -e ".[rl]" && python3 -m soups.quickstart']
    (tests_command,) = _first_bash_block_after("Tests")
    install, run = (part.strip() for part in tests_command.split("&&"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    # .ci/run installs the same extras (quietly) and runs exactly the README's test command
    assert '".[dev]"' in install
    assert any(line.startswith("python3 -m pip install") and '".[dev]"' in line for line in ci)
    assert run in ci


def test_front_page_is_short_and_links_every_docs_page() -> None:
    assert len(README.encode()) <= 40_000
    linked = {Path(p).name for p in re.findall(r"\]\(docs/([\w.-]+\.md)(?:#[^)]*)?\)", README)}
    assert DOCS, "docs/ has pages"
    unlinked = [p.name for p in DOCS if p.name not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_images_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not bad, bad


def test_named_scripts_exist() -> None:
    scripts = set(re.findall(r"(?<![\w/])((?:tests/)?(?:benchmarks|rl|vision|soups|evals)/[\w/]+\.py)\b", ALL_TEXT))
    assert len(scripts) >= 10
    missing = [p for p in sorted(scripts) if not (ROOT / p).is_file()]
    assert not missing, missing


def test_named_experiment_presets_exist() -> None:
    found = re.findall(r"(rl/train_\w+\.py|vision/\w+\.py|soups\.\w+)\b[^\n`]*?\bexperiment=(\w+)", ALL_TEXT)
    assert len(found) >= 8
    missing = [(e, n) for e, n in found if e in ENTRIES
               and not (ROOT / "configs" / ENTRIES[e] / "experiment" / f"{n}.yaml").is_file()]  # fmt: skip
    assert not missing, missing
