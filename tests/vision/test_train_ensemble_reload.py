"""`vision.train_ensemble.load_run`: a finished run rebuilt from `config.yaml` + `model.safetensors` gives back
the stored metrics (the frozen-featurizer path included), `forward_batch` is the timed batch, and a run whose
weights do not fit its config fails clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from evals.ensemble import evaluate_ensemble
from soups.utils import SoupsError
from vision.train_ensemble import (
    forward_batch,
    forward_ms,
    id_test_set,
    inference_parameters,
    load_run,
    member_logits,
    run,
)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs" / "train_ensemble")


def _smoke(out: Path, method: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", f"method={method}", f"output={out}", "steps=3",
                                           "ood.max_samples=64"])
    return run(cfg)


def test_load_run_reproduces_the_stored_metrics(tmp_path: Path) -> None:
    stored = _smoke(tmp_path / "run", "shallow")  # frozen ERM featurizer + heads, and a soup
    cfg, model, splits = load_run(tmp_path / "run")
    assert not model.training
    id_test = id_test_set(splits)
    logits, labels = member_logits(model, id_test, torch.device("cpu"), int(cfg.eval_batch_size))
    e = evaluate_ensemble(logits, labels, None)
    assert e["accuracy"] == stored["ensemble"]["accuracy"]
    assert e["nll"] == pytest.approx(stored["ensemble"]["nll"], abs=1e-6)
    s_logits, _ = member_logits(model.soup(), id_test, torch.device("cpu"), int(cfg.eval_batch_size))
    assert evaluate_ensemble(s_logits, labels, None)["nll"] == pytest.approx(stored["soup"]["nll"], abs=1e-6)
    assert inference_parameters(model) == stored["parameters"]
    x = forward_batch(id_test, int(cfg.eval_batch_size))
    # smoke: eval_batch_size 256; the ID test set is the 3 source domains' 20 % out splits of 1,797 digits
    assert x.shape == (min(256, len(id_test)), 1, 16, 16) == (stored["forward_batch"], 1, 16, 16)
    assert torch.equal(x[0], id_test[0][0])
    assert forward_ms(model, x, repeats=2) > 0


def test_load_run_refuses_weights_of_another_model(tmp_path: Path) -> None:
    _smoke(tmp_path / "run", "deep")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "run", bad)
    cfg = OmegaConf.load(bad / "config.yaml")
    cfg.method.backbone_kwargs.width = 4  # the saved weights are width 8
    OmegaConf.save(cfg, bad / "config.yaml")
    with pytest.raises(SoupsError, match="does not fit deep"):
        load_run(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(SoupsError, match="model.safetensors not found"):
        load_run(bad)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["method"] == "deep"
