"""`python -m soups.serve`: the JSON API against a fresh Soup, no cross-talk under load, bad input, export.

One smoke server (tiny experts of the embedded text task, built offline) serves the module on a free port of
127.0.0.1. Every expected output is decoded by a separate `Soup` of the same experts (serve_fixtures).
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")

from serve_fixtures import compose, post, reference_output, smoke_server  # noqa: E402

from soups.serve_live import check_lambdas  # noqa: E402
from soups.utils import SoupsError  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("serve")
    with smoke_server(workdir, ["front_points=0", "max_prompt_chars=400"]) as (engine, _, url):
        yield engine, url, workdir


@pytest.fixture(scope="module")
def prompt(served) -> str:
    return served[0].live.examples(1)[0]


def test_generate_equals_a_fresh_soup_at_that_lambda(served, prompt) -> None:
    engine, url, _ = served
    status, body = post(f"{url}/api/generate", {"lambdas": [0.3, 0.7], "prompt": prompt, "seed": 0})
    assert status == 200, body
    assert body["lambdas"] == [0.3, 0.7]
    assert body["output"] == reference_output(engine.experts, [0.3, 0.7], prompt, engine.max_new_tokens)
    assert set(body["scores"]) == set(engine.objectives)  # a validation prompt: the rewards can score it
    assert all(math.isfinite(v) for v in body["scores"].values())
    status, again = post(f"{url}/api/generate", {"lambdas": [0.3, 0.7], "prompt": prompt, "seed": 0})
    assert status == 200 and again["cached"] and again["output"] == body["output"]


def test_lambdas_are_normalised_onto_the_simplex(served, prompt) -> None:
    _, url, _ = served
    status, scaled = post(f"{url}/api/generate", {"lambdas": [1, 3], "prompt": prompt})
    assert status == 200, scaled
    assert scaled["lambdas"] == [0.25, 0.75]
    _, direct = post(f"{url}/api/generate", {"lambdas": [0.25, 0.75], "prompt": prompt})
    assert direct["cached"] and direct["output"] == scaled["output"]


def test_no_cross_talk_under_load(served, prompt) -> None:
    """40 concurrent requests over 8 λ each get the output a lone request gets for its λ (cold caches both times)."""
    engine, url, _ = served
    lambdas = [[i / 7, 1 - i / 7] for i in range(8)]
    engine.clear_caches()
    single = {}
    for lam in lambdas:  # one at a time
        status, body = post(f"{url}/api/generate", {"lambdas": lam, "prompt": prompt})
        assert status == 200, body
        single[tuple(body["lambdas"])] = body["output"]
    assert len(set(single.values())) >= 3, "the smoke experts must disagree, or cross-talk could not show"
    engine.clear_caches()
    computed = engine.stats["computed"]
    requests = [lam for lam in lambdas for _ in range(5)]
    random.Random(0).shuffle(requests)
    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(lambda lam: post(f"{url}/api/generate", {"lambdas": lam, "prompt": prompt}), requests))
    assert all(status == 200 for status, _ in results), results
    for lam, (_, body) in zip(requests, results):
        assert body["output"] == single[tuple(body["lambdas"])], lam
    assert engine.stats["computed"] - computed == 8  # same-λ requests shared one generation


BAD = [
    ({"lambdas": [0.5, 0.3, 0.2], "prompt": "p"}, 422, "3 values for 2 experts"),
    ({"lambdas": [float("nan"), 1.0], "prompt": "p"}, 422, "finite"),
    ({"lambdas": [-0.5, 1.5], "prompt": "p"}, 422, "negative"),
    ({"lambdas": [0.5, 0.5], "prompt": "x" * 401}, 422, "at most 400"),
    ({"lambdas": [0, 0], "prompt": "p"}, 422, "sum to 0"),
    ({"lambdas": [0.5, 0.5], "prompt": ""}, 422, "empty"),
    ({"lambdas": [0.5, 0.5], "prompt": "p", "seed": "abc"}, 422, "seed"),
    ({"lambdas": [0.5, 0.5], "prompt": "p", "extrapolate": True}, 422, "extrapolation is off"),
    ({"lambdas": [0.5, 0.5], "prompt": "p", "path": "/etc"}, 422, "unknown field 'path'"),
    ({"lambdas": "0.5,0.5", "prompt": "p"}, 422, "list"),
    ({"prompt": "p"}, 422, "required"),
    (b"{not json", 400, "not JSON"),
]


@pytest.mark.parametrize(("body", "status", "reason"), BAD, ids=[r for _, _, r in BAD])
def test_bad_input_gets_a_one_line_4xx_and_the_server_keeps_serving(served, prompt, body, status, reason) -> None:
    engine, url, _ = served
    raw = body if isinstance(body, bytes) else None
    code, answer = post(f"{url}/api/generate", body, raw=raw)
    assert code == status, answer
    assert reason in answer["error"] and "\n" not in answer["error"], answer
    code, ok = post(f"{url}/api/generate", {"lambdas": [0.5, 0.5], "prompt": prompt})
    assert code == 200 and ok["output"] == reference_output(engine.experts, [0.5, 0.5], prompt, engine.max_new_tokens)


def test_export_writes_the_current_soup_under_the_export_dir(served) -> None:
    from safetensors.torch import load_file

    from soups.mix import mix
    from soups.soup import Soup

    engine, _, workdir = served
    path = engine.export((0.3, 0.7), mix)
    assert path.parent == (workdir / "exports").absolute() and (path / "soup.json").is_file()
    assert engine.export((0.3, 0.7), mix) == path  # the same λ again: nothing rewritten
    written = {}
    for shard in path.glob("*.safetensors"):
        written.update(load_file(shard))
    expected = Soup.from_checkpoints(engine.experts, progress=False).set_weights([0.3, 0.7]).state_dict()
    for key, tensor in written.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6)


def test_export_dir_outside_the_working_directory_is_refused(tmp_path: Path, monkeypatch) -> None:
    from soups.serve import build_live

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SoupsError, match="outside the working directory"):
        build_live(compose(["experiment=smoke", "export_dir=/tmp/elsewhere"]))


def test_info_lists_experts_objectives_and_caps(served) -> None:
    import json
    import urllib.request

    engine, url, _ = served
    with urllib.request.urlopen(f"{url}/api/info", timeout=30) as response:
        info = json.loads(response.read())
    assert info["experts"] == engine.expert_names and info["objectives"] == engine.objectives
    assert info["max_new_tokens"] == 12 and info["max_prompt_chars"] == 400 and not info["allow_extrapolation"]


def test_extrapolation_only_where_the_server_allows_it(tmp_path: Path, monkeypatch) -> None:
    from soups.serve import build_live

    monkeypatch.chdir(tmp_path)
    engine, _ = build_live(compose(["experiment=smoke", f"smoke.dir={tmp_path / 'smoke'}", "front_points=0",
                                    "allow_extrapolation=true"]))  # fmt: skip
    prompt = engine.live.examples(1)[0]
    with pytest.raises(SoupsError, match="negative"):
        engine.generate([-0.5, 1.5], prompt)  # the toggle is off for this request
    result = engine.generate([-1, 3], prompt, extrapolate=True)
    assert result["lambdas"] == [-0.5, 1.5]
    expected = reference_output(engine.experts, [-0.5, 1.5], prompt, engine.max_new_tokens, extrapolate=True)
    assert result["output"] == expected


# ---- pure pieces ------------------------------------------------------------------------------------------------


def test_check_lambdas_normalises_and_stays_on_the_simplex() -> None:
    assert check_lambdas([1, 3], 2) == (0.25, 0.75)
    assert check_lambdas([1, 1, 1], 3) == (0.333333, 0.333333, 0.333334)  # the last one absorbs the rounding
    assert check_lambdas([-1, 3], 2, extrapolate=True) == (-0.5, 1.5)
    with pytest.raises(SoupsError, match="negative"):
        check_lambdas([-1, 3], 2)
    with pytest.raises(SoupsError, match="not a number"):
        check_lambdas([True, 1], 2)


def test_triangle_clicks_map_to_barycentric_lambdas() -> None:
    from soups.serve import _triangle_corners, triangle_lambdas

    corners = _triangle_corners(240)
    for i, (x, y) in enumerate(corners):
        assert triangle_lambdas(x, y) == [1.0 if j == i else 0.0 for j in range(3)]
    cx, cy = corners.mean(axis=0)
    assert triangle_lambdas(cx, cy) == [0.33, 0.33, 0.33]
    (ax, ay), (bx, by) = corners[0], corners[1]
    assert triangle_lambdas((ax + bx) / 2, (ay + by) / 2) == [0.5, 0.5, 0.0]  # the middle of side 1-2
    # Above the top vertex, on the axis: λ_2 = λ_3 < 0 < 1 < λ_1; clipping leaves expert 1 alone.
    assert triangle_lambdas(ax, ay - 100) == [1.0, 0.0, 0.0]


def test_quickstart_run_serves_its_experts_in_order(tmp_path: Path) -> None:
    from soups.serve import quickstart_experts

    for name in ("complete", "faithful"):
        (tmp_path / "experts" / name / "adapter").mkdir(parents=True)
    (tmp_path / "quickstart.yaml").write_text("experts: [faithful, complete]\n")
    paths, names, front = quickstart_experts(tmp_path)
    assert names == ["faithful", "complete"] and front is None
    assert paths == [str(tmp_path / "experts" / n / "adapter") for n in names]
    with pytest.raises(SoupsError, match="not a finished quickstart"):
        quickstart_experts(tmp_path / "nope")


def test_serve_evaluator_node_is_the_pareto_one() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"

    def body(path: Path) -> list[str]:
        lines = path.read_text().splitlines()
        return lines[next(i for i, line in enumerate(lines) if not line.startswith("#")) :]

    assert body(configs / "serve/evaluator/text.yaml") == body(configs / "pareto/evaluator/text.yaml")
