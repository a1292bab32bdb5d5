"""Shared by tests/soups/test_serve*.py: the smoke server on a free 127.0.0.1 port, and an independent reference.

The reference output at λ is what a FRESH `Soup` of the same experts, set to λ, decodes greedily with
`generate`: it shares no state (cache, lock, resident model) with the server under test.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "serve"


def compose(overrides: Sequence[str]) -> Any:
    """configs/serve/config.yaml with `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@contextmanager
def smoke_server(workdir: Path, overrides: Sequence[str] = ()) -> Iterator[tuple[Any, list, str]]:
    """`experiment=smoke` served from `workdir` (experts and exports below it): yields (engine, front rows, URL)."""
    from soups.serve import build_app, build_live, serve_in_thread

    previous = Path.cwd()
    os.chdir(workdir)  # export_dir must lie under the server's working directory
    server = None
    try:
        cfg = compose(["experiment=smoke", f"smoke.dir={workdir / 'smoke'}", "export_dir=exports", *overrides])
        engine, rows = build_live(cfg)
        app = build_app(engine, rows, n_examples=int(cfg.n_examples), seed=int(cfg.seed))
        server, thread, url = serve_in_thread(app, "127.0.0.1", 0)
        yield engine, rows, url
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(timeout=10)
        os.chdir(previous)


def post(url: str, body: Any, *, raw: bytes | None = None, timeout: float = 120) -> tuple[int, dict]:
    """POST JSON to `url`; (status, decoded body), 4xx/5xx included."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def reference_output(
    experts: Sequence[str], lam: Sequence[float], prompt: str, max_new_tokens: int, *, extrapolate: bool = False
) -> str:
    """Greedy output of a fresh `Soup` of `experts` set to λ (the tokenizer saved beside the first expert)."""
    import torch
    from transformers import AutoTokenizer

    from soups.soup import Soup

    soup = Soup.from_checkpoints(list(experts), progress=False, allow_extrapolation=extrapolate)
    model = soup.set_weights(list(lam))
    tokenizer = AutoTokenizer.from_pretrained(experts[0])
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
