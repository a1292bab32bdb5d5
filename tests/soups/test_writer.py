"""The soup writer: valid sharded safetensors, provenance, atomicity, and refusal to clobber anything."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from soups.checkpoint import Checkpoint, open_checkpoint
from soups.interpolate import interpolate
from soups.utils import SoupsError
from soups.writer import check_output_path, parse_size, write_soup


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 16, generator=g),  # 4096 bytes
        "a.bias": torch.randn(64, generator=g).to(torch.bfloat16),  # 128 bytes
        "b.weight": torch.randn(32, 32, generator=g),  # 4096 bytes
        "bn.num_batches_tracked": torch.tensor(7),  # 8 bytes
        "c.weight": torch.randn(16, 8, generator=g).to(torch.float16),  # 256 bytes
        "empty": torch.zeros(0, 4),
    }


def _expert(tmp_path: Path, name: str = "expert", tensors: dict[str, torch.Tensor] | None = None) -> Checkpoint:
    d = tmp_path / name
    d.mkdir()
    save_file(tensors or _tensors(), d / "model.safetensors")
    (d / "config.json").write_text('{"model_type": "toy"}')
    (d / "tokenizer.json").write_text('{"tok": 1}')
    (d / "generation_config.json").write_text('{"max_length": 5}')
    (d / "notes.txt").write_text("not a config file")
    return open_checkpoint(d)


def _read_soup(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("model*.safetensors")):
        out.update(load_file(shard))
    return out


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(" 1.5 kb ") == 1500
    assert parse_size(4096) == 4096
    with pytest.raises(SoupsError, match="bad max_shard_size 'lots'"):
        parse_size("lots")
    with pytest.raises(SoupsError, match="must be positive"):
        parse_size(0)


@pytest.mark.parametrize("announced", [False, True], ids=["buffered", "planned"])
def test_sharded_output_reads_back_exactly(tmp_path: Path, announced: bool) -> None:
    expert = _expert(tmp_path)
    tensors = _tensors()
    if announced:  # interpolate announces specs: tensors go straight to their offsets
        stream = interpolate([expert], [1.0])
        assert hasattr(stream, "specs")
    else:
        stream = iter(tensors.items())
    out = write_soup(tmp_path / "soup", stream, ingredients=[expert], weights=[1.0], mode="linear",
                     config_source=expert.config_dir, max_shard_size=5000, progress=False)
    # Greedy at 5000 bytes: the two 4096-byte matrices cannot share a shard, the small tensors fill in:
    # 2 shards whatever the order (dict order [a.weight 4096 + a.bias 128] | [b.weight 4096 + 8 + 256 + 0];
    # file order, float32 first: [a.weight] | [b.weight + the rest]).
    shards = sorted(out.glob("model-*.safetensors"))
    assert [p.name for p in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["a.weight"] == shards[0].name and index["weight_map"]["b.weight"] == shards[1].name
    assert index["weight_map"]["c.weight"] == shards[1].name
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in shards)
    back = _read_soup(out)
    assert set(back) == set(tensors)
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    with safe_open(str(shards[0]), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    # No temporary shard names or temp dirs left behind.
    assert not list(out.glob(".shard-*")) and not list(tmp_path.glob(".soup.tmp-*"))


def test_single_shard_is_named_model_safetensors_and_config_files_are_copied(tmp_path: Path) -> None:
    expert = _expert(tmp_path)
    out = write_soup(tmp_path / "soup", iter(_tensors().items()), ingredients=[expert], weights=[1.0],
                     mode="linear", config_source=expert.config_dir, progress=False,
                     resolved_config={"weights": [1.0]})
    names = sorted(p.name for p in out.iterdir())
    assert names == [".soups", "README.md", "config.json", "config.yaml", "generation_config.json", "model.safetensors",
                     "soup.json", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == '{"tok": 1}'


def test_soup_json_records_sha256_weights_and_versions(tmp_path: Path) -> None:
    e0 = _expert(tmp_path, "e0")
    e1 = _expert(tmp_path, "e1", {k: v + 1 if v.is_floating_point() else v for k, v in _tensors().items()})
    out = write_soup(tmp_path / "soup", interpolate([e0, e1], [0.25, 0.75]), ingredients=[e0, e1],
                     weights=[0.25, 0.75], mode="linear", config_source=e0.config_dir,
                     extra_metadata={"keys": "exact"}, progress=False)
    record = json.loads((out / "soup.json").read_text())
    assert record["mode"] == "linear" and record["weights"] == [0.25, 0.75] and record["keys"] == "exact"
    assert [ing["path"] for ing in record["ingredients"]] == [str(e0.path), str(e1.path)]
    for ing, ckpt in zip(record["ingredients"], [e0, e1]):
        (file_record,) = ing["files"]
        weights_file = ckpt.path / "model.safetensors"
        assert file_record["sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
        assert file_record["bytes"] == weights_file.stat().st_size
    assert record["ingredients"][0]["files"][0]["sha256"] != record["ingredients"][1]["files"][0]["sha256"]
    assert {"torch", "safetensors", "python"} <= set(record["versions"])
    assert record["tensors"] == 6
    card = (out / "README.md").read_text()
    assert "0.25" in card and "0.75" in card and str(e0.path) in card


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    expert = _expert(tmp_path)
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "keep.txt").write_text("previous soup")
    (tmp_path / "soup" / "soup.json").write_text("{}")  # a soup written before atomic_dir's .soups marker existed
    with pytest.raises(SoupsError, match=r"output .*soup already exists; pass overwrite=true"):
        write_soup(tmp_path / "soup", iter(_tensors().items()), ingredients=[expert], weights=[1.0],
                   mode="linear", config_source=None, progress=False)
    assert (tmp_path / "soup" / "keep.txt").read_text() == "previous soup"
    write_soup(tmp_path / "soup", iter(_tensors().items()), ingredients=[expert], weights=[1.0], mode="linear",
               config_source=None, overwrite=True, progress=False)
    assert not (tmp_path / "soup" / "keep.txt").exists() and (tmp_path / "soup" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("expert", "is an ingredient"),
        ("expert/sub", "is inside ingredient"),
        (".", "contains ingredient"),
    ],
)
def test_output_clashing_with_an_ingredient_is_refused(tmp_path: Path, output: str, message: str) -> None:
    expert = _expert(tmp_path)
    before = sorted(p.name for p in expert.path.iterdir())
    with pytest.raises(SoupsError, match=message):
        write_soup(tmp_path / output, iter(_tensors().items()), ingredients=[expert], weights=[1.0],
                   mode="linear", config_source=expert.config_dir, overwrite=True, progress=False)
    assert sorted(p.name for p in expert.path.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]


def test_check_output_path_resolves_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SoupsError, match="is an ingredient"):
        check_output_path(tmp_path / "link", [tmp_path / "real"])


def test_a_failure_mid_stream_leaves_nothing_behind(tmp_path: Path) -> None:
    expert = _expert(tmp_path)

    def failing() -> Iterator[tuple[str, torch.Tensor]]:
        yield "a.weight", torch.zeros(2)
        raise SoupsError("tensor 'b' exploded")

    with pytest.raises(SoupsError, match="exploded"):
        write_soup(tmp_path / "soup", failing(), ingredients=[expert], weights=[1.0], mode="linear",
                   config_source=None, max_shard_size=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]


def test_nan_soup_is_never_saved(tmp_path: Path) -> None:
    a = _expert(tmp_path, "a", {"w": torch.ones(3)})
    b = _expert(tmp_path, "b", {"w": torch.tensor([1.0, float("nan"), 1.0])})
    with pytest.raises(SoupsError, match=r"tensor 'w' of expert .*b holds NaN"):
        write_soup(tmp_path / "soup", interpolate([a, b], [0.5, 0.5]), ingredients=[a, b], weights=[0.5, 0.5],
                   mode="linear", config_source=a.config_dir, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_adapter_files(tmp_path: Path) -> None:
    expert = _expert(tmp_path)
    adapter_config = {"peft_type": "LORA", "r": 4}
    out = write_soup(tmp_path / "soup", iter({"x.lora_A.weight": torch.ones(4, 2)}.items()), ingredients=[expert],
                     weights=[1.0], mode="lora-delta", config_source=expert.config_dir, files="adapter",
                     adapter_config=adapter_config, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert "adapter_model.safetensors" in names and "config.json" not in names
    assert json.loads((out / "adapter_config.json").read_text()) == adapter_config
    assert torch.equal(load_file(out / "adapter_model.safetensors")["x.lora_A.weight"], torch.ones(4, 2))
    with pytest.raises(SoupsError, match="needs adapter_config"):
        write_soup(tmp_path / "soup2", iter([]), ingredients=[expert], weights=[1.0], mode="x",
                   config_source=None, files="adapter")
