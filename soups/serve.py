"""`python -m soups.serve`: the live λ page, generations from ONE resident soup as the user moves λ.

    python -m soups.serve experts=[A,B] evaluator=text      # the same experts/evaluator nodes as soups.pareto
    python -m soups.serve run=runs/quickstart               # a finished quickstart, with its front
    python -m soups.serve experiment=smoke                  # tiny experts built offline in seconds

A Gradio page (`gr.Blocks`, the optional extra `.[serve]`) mounted on a FastAPI app beside a JSON API:

- λ: one slider per expert, shown normalised onto the simplex; for three experts also a clickable triangle; an
  "extrapolate" toggle only when `allow_extrapolation=true`.
- a prompt box with example prompts from the task's validation set, a seed, Generate;
- the soup's output beside each expert's output for the same prompt and seed; the output's scores and the soup's
  mean objectives at λ on the evaluator's small validation batch (cached per λ);
- the front (a given `front.jsonl`, or a coarse one computed at start-up) with a marker at the current λ;
- "Export this soup": the current λ's soup written by `soups.mix.mix` under `export_dir`, path shown.

`POST /api/generate` takes {"lambdas": [...], "prompt": "...", "seed": 0} and answers {"lambdas": [...],
"output": ..., "scores": {...}, "cached": bool}; a bad request gets a 4xx with {"error": "<one line>"}.
`GET /api/info` lists the experts, objectives and caps. The engine (lock, caches, checks) is
`soups.serve_live.LiveSoup`; tasks come through the evaluator registry (`soups.pareto_registry`).

Security defaults: bound to 127.0.0.1:7860, never a share link; the browser never names a file path; every
input is checked (λ length, finiteness, sign unless extrapolation is on; prompt length; seed).
"""

from __future__ import annotations

import os

from soups.cli import entry, precheck

precheck(__name__, __file__, "../configs/serve")  # a bad command line fails here, before the heavy imports
# Gradio reports usage to its authors unless told not to; nothing leaves this machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import json
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Request  # at module level: FastAPI resolves the handler's string annotation here
from omegaconf import DictConfig, OmegaConf

from soups.serve_live import LiveSoup, front_rows, live_evaluator, stats_row
from soups.utils import SoupsError

__all__ = ["build_live", "build_app", "build_smoke_experts", "quickstart_experts", "serve_in_thread", "main"]

# ---------------------------------------------------------------------------------------------------------------
# Experts: given, from a quickstart run, or the smoke preset's
# ---------------------------------------------------------------------------------------------------------------


# The family module that builds each evaluator's smoke experts (`build_smoke_experts(root, n, seed, scale)`),
# named as data and imported on demand, as `EVALUATOR_MODULES` does: soups does not import rl.
SMOKE_EXPERT_MODULES: dict[str, str] = {"text": "rl.text.sft"}


def build_smoke_experts(root: str | Path, n: int, seed: int, scale: float = 0.05, *, task: str = "text") -> list[Path]:
    """Tiny experts of `task` for `experiment=smoke`, built offline in seconds by the family's own builder.

    Raises:
        SoupsError: no smoke builder for `task` (the valid ones are listed).
    """
    import importlib

    if task not in SMOKE_EXPERT_MODULES:
        raise SoupsError(f"no smoke experts for evaluator {task!r}; valid: {', '.join(sorted(SMOKE_EXPERT_MODULES))}")
    module = importlib.import_module(SMOKE_EXPERT_MODULES[task])
    return module.build_smoke_experts(root, n, seed, scale)


def quickstart_experts(run: str | Path) -> tuple[list[str], list[str], Path | None]:
    """The experts of a finished quickstart: (adapter paths, reward names, its front.jsonl or None).

    Raises:
        SoupsError: not a quickstart directory, or an expert without its adapter.
    """
    from omegaconf import OmegaConf

    run = Path(run)
    if not (run / "experts").is_dir():
        raise SoupsError(f"run={run} is not a finished quickstart (no experts/ directory); run python -m "
                         "soups.quickstart first, or give experts=[...]")  # fmt: skip
    names: list[str] = []
    if (run / "quickstart.yaml").is_file():
        names = [str(n) for n in OmegaConf.load(run / "quickstart.yaml").get("experts") or []]
    if not names:
        names = sorted(p.name for p in (run / "experts").iterdir() if p.is_dir())
    paths = []
    for name in names:
        adapter = run / "experts" / name / "adapter"
        if not adapter.is_dir():
            raise SoupsError(f"quickstart expert {name} has no adapter at {adapter}; is the quickstart finished?")
        paths.append(str(adapter))
    front = run / "front" / "front.jsonl"
    return paths, names, front if front.is_file() else None


def _name_of(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name in {"final", "adapter", "checkpoint", "model", "last", "best"} else p.name


# ---------------------------------------------------------------------------------------------------------------
# The engine and the start-up front
# ---------------------------------------------------------------------------------------------------------------


def build_live(cfg: DictConfig) -> tuple[LiveSoup, list[dict[str, Any]]]:
    """The resident soup and its task from `cfg` (configs/serve/config.yaml), and the rows of the front drawn.

    Raises:
        SoupsError: no experts, fewer than 2, experts that cannot be mixed, an export dir outside the working
            directory, a front file that does not score the served objectives...
    """
    from soups.front import check_device_and_dtype, open_soup
    from soups.pareto_registry import build_evaluator

    dtype = check_device_and_dtype(str(cfg.device), cfg.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else \
        torch.device(cfg.device)  # fmt: skip
    export_dir = Path(cfg.export_dir).absolute()
    cwd = Path.cwd().resolve()
    if not export_dir.resolve().is_relative_to(cwd):
        raise SoupsError(
            f"export_dir={cfg.export_dir} resolves to {export_dir.resolve()}, outside the working "
            f"directory {cwd}; exports stay under the directory the server runs from"
        )
    front_file = cfg.front
    names = [str(n) for n in cfg.expert_names]
    if cfg.smoke.enabled:
        built = build_smoke_experts(cfg.smoke.dir, int(cfg.smoke.n_experts), int(cfg.seed), float(cfg.smoke.scale),
                                    task=str(cfg.evaluator.name))
        experts = [str(p) for p in built]
    elif cfg.run is not None:
        if cfg.experts is not None:
            raise SoupsError("give run= or experts=, not both")
        experts, run_names, run_front = quickstart_experts(cfg.run)
        names = names or run_names
        front_file = front_file or run_front
    elif cfg.experts is None:
        raise SoupsError("no experts: give experts=[A,B] (adapters or checkpoints), run=<quickstart dir>, or "
                         "experiment=smoke")  # fmt: skip
    else:
        if not OmegaConf.is_list(cfg.experts):
            raise SoupsError(f"experts must be a list, e.g. experts=[A,B]; got {cfg.experts!r}")
        experts = [str(p) for p in cfg.experts]
    if len(experts) < 2:
        raise SoupsError(f"the page mixes at least 2 experts, got {len(experts)}: {experts}")
    names = names or [_name_of(p) for p in experts]
    evaluator = build_evaluator(cfg.evaluator, experts=experts, device=device)
    live = live_evaluator(evaluator, str(cfg.evaluator.name))
    rows = front_rows(front_file, live.objectives) if front_file else []
    soup = open_soup(experts, base_model=cfg.base_model, device=device, dtype=dtype,
                     allow_extrapolation=bool(cfg.allow_extrapolation))  # fmt: skip
    engine = LiveSoup(soup, live, experts=experts, expert_names=names, max_new_tokens=int(cfg.max_new_tokens),
                      max_prompt_chars=int(cfg.max_prompt_chars), allow_extrapolation=bool(cfg.allow_extrapolation),
                      export_dir=export_dir, cache_size=int(cfg.cache_size))  # fmt: skip
    if not rows and int(cfg.front_points) > 0:
        rows = startup_front(engine, int(cfg.front_points))
    return engine, rows


def startup_front(engine: LiveSoup, n_points: int) -> list[dict[str, Any]]:
    """A coarse front: the validation means on the largest simplex grid with at most `n_points` points."""
    from soups.front import grid_divisions
    from soups.simplex import simplex_grid

    k = grid_divisions(engine.n_experts, max(n_points, engine.n_experts))
    rows = []
    for lam in np.asarray(simplex_grid(engine.n_experts, k), dtype=float).tolist():
        lam = [round(x, 6) for x in lam]
        vertex = [i for i, x in enumerate(lam) if x > 0]
        kind, name = ("expert", engine.expert_names[vertex[0]]) if len(vertex) == 1 else ("soup", "")
        rows.append(stats_row(kind, name, lam, engine.validation(lam)))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------


def _triangle_image(size: int = 240) -> np.ndarray:
    """An RGB image of the λ simplex for 3 experts (vertices: top = expert 1, bottom-left = 2, bottom-right = 3)."""
    corners = _triangle_corners(size)
    ys, xs = np.mgrid[0:size, 0:size].astype(float)
    bary = _barycentric(xs, ys, corners)  # [3, H, W]
    inside = (bary >= 0).all(axis=0)
    colours = np.array([[214, 39, 40], [31, 119, 180], [44, 160, 44]], dtype=float)  # one per expert
    img = np.full((size, size, 3), 255.0)
    img[inside] = np.einsum("kn,kc->nc", bary[:, inside], colours) * 0.55 + 255 * 0.45
    return img.astype(np.uint8)


def _triangle_corners(size: int) -> np.ndarray:
    pad = size * 0.06
    return np.array([[size / 2, pad], [pad, size - pad], [size - pad, size - pad]])


def _barycentric(x: Any, y: Any, corners: np.ndarray) -> np.ndarray:
    """Barycentric coordinates of points (x, y) in the triangle `corners` [3, 2]; shape [3, *x.shape]."""
    (x1, y1), (x2, y2), (x3, y3) = corners
    det = (y2 - y3) * (x1 - x3) + (x3 - x2) * (y1 - y3)
    a = ((y2 - y3) * (x - x3) + (x3 - x2) * (y - y3)) / det
    b = ((y3 - y1) * (x - x3) + (x1 - x3) * (y - y3)) / det
    return np.stack([a, b, 1 - a - b])


def triangle_lambdas(x: float, y: float, size: int = 240) -> list[float]:
    """λ of a click at pixel (x, y) of the triangle image, clipped onto the simplex."""
    bary = np.clip(_barycentric(np.float64(x), np.float64(y), _triangle_corners(size)), 0, None)
    return [round(float(v), 2) for v in bary / bary.sum()]


def front_figure(rows: Sequence[dict[str, Any]], objectives: Sequence[str], current: dict[str, Any] | None) -> Any:
    """The front on the plane of the first two objectives, with the current λ's validation means as a star."""
    import matplotlib.pyplot as plt

    from soups.plots import _draw_pair

    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    if len(objectives) >= 2:
        _draw_pair(ax, rows, objectives[0], objectives[1], {}, objectives)
        if current is not None:
            x, y = (current["objectives"][k]["mean"] for k in objectives[:2])
            ax.scatter([x], [y], marker="*", s=320, c="gold", edgecolors="black", zorder=10, label="current λ")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "a front needs 2 objectives", ha="center", va="center")
        ax.axis("off")
    fig.tight_layout()
    plt.close(fig)  # gradio renders the figure object; pyplot must not keep it
    return fig


def _scores_table(objectives: Sequence[str], scores: dict[str, float] | None, validation: dict) -> list[list[Any]]:
    rows = []
    for k in objectives:
        stat = validation[k]
        out = "n/a" if scores is None else f"{scores[k]:.4f}"
        rows.append([k, out, f"{stat[0]:.4f} ± {stat[1]:.4f} (n={stat[2]})"])
    return rows


def build_blocks(engine: LiveSoup, rows: Sequence[dict[str, Any]], *, n_examples: int = 8, seed: int = 0) -> Any:
    """The Gradio page on `engine`."""
    import gradio as gr

    from soups.merge import mix

    n = engine.n_experts
    objectives = engine.objectives
    lo, hi = (-1.0, 2.0) if engine.allow_extrapolation else (0.0, 1.0)

    def normalised(values: Sequence[float], extrapolate: bool) -> tuple[float, ...]:
        from soups.serve_live import check_lambdas

        return check_lambdas([float(v) for v in values], n, extrapolate=extrapolate)

    def lam_text(values: Sequence[float], extrapolate: bool) -> str:
        try:
            lam = normalised(values, extrapolate)
        except SoupsError as err:
            return f"**error:** {err}"
        return "λ on the simplex: " + ", ".join(f"{name} {x:.3f}" for name, x in zip(engine.expert_names, lam))

    def on_generate(prompt: str, seed_value: float, extrapolate: bool, *values: float) -> list[Any]:
        skip = [gr.update()] * (4 + n)
        try:
            seed_int = int(seed_value) if seed_value is not None and float(seed_value).is_integer() else seed_value
            result = engine.generate(list(values), prompt, seed_int, extrapolate=bool(extrapolate))
            experts = engine.expert_outputs(prompt, seed_int)
            validation = engine.validation(result["lambdas"])
        except SoupsError as err:
            return [*skip, f"**error:** {err}"]
        current = stats_row("soup", "current", result["lambdas"], validation)
        return [lam_text(values, bool(extrapolate)), result["output"], *experts,
                _scores_table(objectives, result["scores"], validation), front_figure(rows, objectives, current),
                "ok"]  # fmt: skip

    def on_export(extrapolate: bool, *values: float) -> str:
        try:
            path = engine.export(normalised(values, bool(extrapolate)), mix)
        except SoupsError as err:
            return f"**error:** {err}"
        return f"exported to `{path}`"

    with gr.Blocks(title="Soups · live λ", analytics_enabled=False) as page:
        gr.Markdown("## Rewarded soups: pick your trade-off\nOne resident model; its weights are set to "
                    "Σ λ_i θ_i as you move λ. Experts: " + ", ".join(engine.expert_names))  # fmt: skip
        with gr.Row():
            with gr.Column(scale=1):
                sliders = [gr.Slider(lo, hi, value=round(1.0 / n, 2), step=0.01, label=f"λ {name}",
                                     elem_id=f"lambda-{i}") for i, name in enumerate(engine.expert_names)]  # fmt: skip
                lam_md = gr.Markdown(lam_text([1.0 / n] * n, False), elem_id="lambda-normalised")
                triangle = None
                if n == 3:
                    triangle = gr.Image(_triangle_image(), label="click the simplex (top: expert 1)",
                                        interactive=False, elem_id="lambda-triangle")  # fmt: skip
                extrapolate = gr.Checkbox(False, label="extrapolate (λ off the simplex)",
                                          visible=engine.allow_extrapolation, elem_id="extrapolate")  # fmt: skip
                examples = engine.live.examples(n_examples)
                prompt = gr.Textbox(examples[0] if examples else "", label="prompt", lines=3, elem_id="prompt",
                                    max_length=engine.max_prompt_chars)  # fmt: skip
                if examples:
                    gr.Examples([[e] for e in examples], inputs=[prompt], label="validation prompts")
                seed_box = gr.Number(seed, label="seed", precision=0, elem_id="seed")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    export = gr.Button("Export this soup", elem_id="export")
                export_md = gr.Markdown(elem_id="export-path")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                soup_out = gr.Textbox(label="soup at λ", lines=3, interactive=False, elem_id="soup-output")
                with gr.Row():
                    expert_outs = [gr.Textbox(label=f"expert {name} (λ = e_{i + 1})", lines=3, interactive=False,
                                              elem_id=f"expert-output-{i}")
                                   for i, name in enumerate(engine.expert_names)]  # fmt: skip
                scores = gr.Dataframe(headers=["objective", "this output", "soup at λ, validation mean ± se"],
                                      interactive=False, elem_id="scores")  # fmt: skip
                plot = gr.Plot(front_figure(rows, objectives, None), label="front", elem_id="front")
        inputs = [prompt, seed_box, extrapolate, *sliders]
        outputs = [lam_md, soup_out, *expert_outs, scores, plot, status]
        generate.click(on_generate, inputs, outputs)
        for slider in sliders:
            slider.release(on_generate, inputs, outputs)
        export.click(on_export, [extrapolate, *sliders], [export_md])
        if triangle is not None:

            def on_triangle(evt: gr.SelectData) -> list[float]:
                return triangle_lambdas(*evt.index)

            # gradio finds the click data by the parameter's type; this module's annotations are strings
            on_triangle.__annotations__["evt"] = gr.SelectData

            triangle.select(on_triangle, None, sliders).then(on_generate, inputs, outputs)
    return page


# ---------------------------------------------------------------------------------------------------------------
# The app: the page and the JSON API on one FastAPI app
# ---------------------------------------------------------------------------------------------------------------

_API_KEYS = {"lambdas", "prompt", "seed", "extrapolate"}


def build_app(engine: LiveSoup, rows: Sequence[dict[str, Any]], *, n_examples: int = 8, seed: int = 0) -> Any:
    """A FastAPI app serving `POST /api/generate`, `GET /api/info` and the page at `/`."""
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)

    @app.post("/api/generate")
    async def api_generate(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return error(400, f"the body is not JSON: {err}")
        if not isinstance(body, dict):
            return error(422, f"the body must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - _API_KEYS)
        if unknown:
            return error(422, f"unknown field {unknown[0]!r}; valid: {', '.join(sorted(_API_KEYS))}")
        if "lambdas" not in body or "prompt" not in body:
            return error(422, "lambdas and prompt are required")
        extrapolate = body.get("extrapolate", False)
        if not isinstance(extrapolate, bool):
            return error(422, f"extrapolate must be true or false, got {extrapolate!r}")
        try:
            result = await run_in_threadpool(engine.generate, body["lambdas"], body["prompt"], body.get("seed", seed),
                                             extrapolate=extrapolate)  # fmt: skip
        except SoupsError as err:
            return error(422, str(err))
        except Exception as err:  # noqa: BLE001 - the API answers one line, never a traceback
            return error(500, f"{type(err).__name__}: {err}")
        return result

    @app.get("/api/info")
    def api_info() -> dict[str, Any]:
        return {"experts": engine.expert_names, "objectives": engine.objectives,
                "max_new_tokens": engine.max_new_tokens, "max_prompt_chars": engine.max_prompt_chars,
                "allow_extrapolation": engine.allow_extrapolation, "kind": engine.live.kind}  # fmt: skip

    page = build_blocks(engine, rows, n_examples=n_examples, seed=seed)
    page.queue(default_concurrency_limit=1)  # the model lock serialises anyway; the queue keeps the order
    # System fonts: the default theme would fetch its font from Google, and the page must work offline.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # fmt: skip
    return gr.mount_gradio_app(app, page, path="/", theme=theme, ssr_mode=False, mcp_server=False)


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> tuple[Any, threading.Thread, str]:
    """Runs `app` with uvicorn in a daemon thread; port 0 picks a free port (bound here, so no race).

    Returns:
        (the uvicorn server: set `.should_exit = True` to stop it, its thread, the base URL).
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SoupsError(f"the server on {host}:{sock.getsockname()[1]} did not start")
        time.sleep(0.05)
    return server, thread, f"http://{host}:{sock.getsockname()[1]}"


def run(cfg: DictConfig) -> None:
    """Builds the engine and serves the page until interrupted."""
    import uvicorn

    engine, rows = build_live(cfg)
    app = build_app(engine, rows, n_examples=int(cfg.n_examples), seed=int(cfg.seed))
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: host={cfg.host} exposes the page and the API beyond this machine")
    print(f"serving {engine.n_experts} experts ({', '.join(engine.expert_names)}) on http://{cfg.host}:{cfg.port}")
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_level="warning")


@entry("../configs/serve")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m soups.serve experts=[A,B] ...`."""
    run(cfg)


if __name__ == "__main__":
    main()
