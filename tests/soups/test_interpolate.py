"""The weighted sum: weights validation, fp32 accumulation, key policies, streaming, non-finite refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from soups.checkpoint import Checkpoint, open_checkpoint
from soups.interpolate import interpolate, parse_dtype, plan_interpolation, validate_weights, weighted_sum
from soups.utils import SoupsError


def _file(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    save_file(tensors, tmp_path / f"{name}.safetensors")
    return open_checkpoint(tmp_path / f"{name}.safetensors")


def _gpt2_experts(tmp_path: Path, n: int, dtype: torch.dtype = torch.float32) -> list[Checkpoint]:
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=8, vocab_size=32, bos_token_id=0, eos_token_id=0)
    out = []
    for i in range(n):
        torch.manual_seed(i)
        GPT2LMHeadModel(config).to(dtype).save_pretrained(tmp_path / f"e{i}", max_shard_size="10KB")
        out.append(open_checkpoint(tmp_path / f"e{i}"))
    return out


# ---- validate_weights ---------------------------------------------------------------------------------------


def test_validate_weights_accepts_simplex_points() -> None:
    assert validate_weights([0.2, 0.3, 0.5], 3) == [0.2, 0.3, 0.5]
    assert validate_weights([1, 0], 2) == [1.0, 0.0]
    # 0.1 + 0.2 + 0.7 = 1.0000000000000002 in binary floating point: within the 1e-6 tolerance.
    assert validate_weights([0.1, 0.2, 0.7], 3) == [0.1, 0.2, 0.7]


@pytest.mark.parametrize(
    ("weights", "n", "message"),
    [
        ([0.5, 0.5], 3, r"got 2 weights \[0.5, 0.5\] for 3 experts"),
        ([float("nan"), 1.0], 2, "weight 0 is nan"),
        ([1.0, float("inf")], 2, "weight 1 is inf"),
        ([1.5, -0.5], 2, r"weight 1 is negative \(-0.5\).*allow_extrapolation"),
        ([0.5, 0.4], 2, "sum to 0.9, not 1"),
        (["a", 1.0], 2, "weight 0 is not a number: 'a'"),
        ([True, 0.0], 2, "weight 0 is a boolean"),
    ],
)
def test_validate_weights_names_the_bad_value(weights: list, n: int, message: str) -> None:
    with pytest.raises(SoupsError, match=message):
        validate_weights(weights, n)


def test_extrapolation_allows_off_simplex_but_not_nan() -> None:
    assert validate_weights([1.5, -0.5], 2, allow_extrapolation=True) == [1.5, -0.5]
    assert validate_weights([1.0, 1.0], 2, allow_extrapolation=True) == [1.0, 1.0]
    with pytest.raises(SoupsError, match="weight 1 is nan"):
        validate_weights([1.0, float("nan")], 2, allow_extrapolation=True)


def test_parse_dtype() -> None:
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_dtype(None) is None and parse_dtype("null") is None
    with pytest.raises(SoupsError, match="unknown dtype 'int8'"):
        parse_dtype("int8")


# ---- weighted_sum -------------------------------------------------------------------------------------------


def test_weighted_sum_hand_worked() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    # 0.25*1 + 0.75*3 = 2.5 ; 0.25*2 + 0.75*4 = 3.5
    assert torch.equal(weighted_sum([a, b], [0.25, 0.75]), torch.tensor([2.5, 3.5]))
    # task arithmetic: 1.5*a - 0.5*b = [1.5 - 1.5, 3 - 2] = [0, 1]
    assert torch.equal(weighted_sum([a, b], [1.5, -0.5]), torch.tensor([0.0, 1.0]))


def test_weighted_sum_accumulates_bf16_in_fp32() -> None:
    # bf16 has 8 significant bits: near 256 the spacing is 2, so summing in bf16 gives 256 + 1 -> 256 (tie to
    # even), twice: 256. In fp32 256 + 1 + 1 = 258, which bf16 represents exactly.
    tensors = [torch.tensor([256.0], dtype=torch.bfloat16), torch.ones(1, dtype=torch.bfloat16),
               torch.ones(1, dtype=torch.bfloat16)]
    naive = tensors[0] + tensors[1] + tensors[2]
    assert naive.item() == 256.0
    out = weighted_sum(tensors, [1.0, 1.0, 1.0])
    assert out.dtype == torch.bfloat16 and out.item() == 258.0


def test_weighted_sum_integers_come_from_the_first_expert() -> None:
    out = weighted_sum([torch.tensor([5]), torch.tensor([7])], [0.5, 0.5])
    assert out.dtype == torch.int64 and out.tolist() == [5]


def test_weighted_sum_skips_zero_weights_and_checks_shapes() -> None:
    # An expert with weight 0 does not contribute, even if it holds NaN (0 * NaN would be NaN).
    out = weighted_sum([torch.tensor([2.0]), torch.tensor([float("nan")])], [1.0, 0.0])
    assert out.tolist() == [2.0]
    with pytest.raises(SoupsError, match=r"tensor 1 has shape \(3,\), tensor 0 \(2,\)"):
        weighted_sum([torch.zeros(2), torch.zeros(3)], [0.5, 0.5])
    with pytest.raises(SoupsError, match="got 1 tensors for 2 weights"):
        weighted_sum([torch.zeros(2)], [0.5, 0.5])


def test_weighted_sum_output_dtype() -> None:
    # 0.5*1 + 0.5*2 = 1.5, representable in fp16.
    out = weighted_sum([torch.tensor([1.0]), torch.tensor([2.0])], [0.5, 0.5], out_dtype=torch.float16)
    assert out.dtype == torch.float16 and out.item() == 1.5


# ---- interpolate on real checkpoints ------------------------------------------------------------------------


def test_three_gpt2_experts_equal_the_weighted_sum_of_every_tensor(tmp_path: Path) -> None:
    experts = _gpt2_experts(tmp_path, 3)
    lam = [0.2, 0.3, 0.5]
    out = dict(interpolate(experts, lam))
    assert set(out) == set(experts[0].keys())
    for key, tensor in out.items():
        ref = sum(w * e.get_tensor(key).double() for w, e in zip(lam, experts))
        assert tensor.dtype == experts[0].dtype(key)
        if tensor.is_floating_point():
            rel = (tensor.double() - ref).norm() / ref.norm().clamp_min(1e-30)
            assert rel <= 1e-6, (key, float(rel))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_single_expert_with_weight_one_reproduces_itself_bitwise(tmp_path: Path, dtype: torch.dtype) -> None:
    (expert,) = _gpt2_experts(tmp_path, 1, dtype)
    for key, tensor in interpolate([expert], [1.0]):
        assert tensor.dtype == dtype
        assert torch.equal(tensor, expert.get_tensor(key)), key


def test_dtype_override_casts_floats_only(tmp_path: Path) -> None:
    n = "bn.num_batches_tracked"
    a = _file(tmp_path, "a", {"w": torch.tensor([1.0, 3.0]), n: torch.tensor(4)})
    b = _file(tmp_path, "b", {"w": torch.tensor([3.0, 5.0]), n: torch.tensor(9)})
    out = dict(interpolate([a, b], [0.5, 0.5], dtype="bf16"))
    # (1 + 3)/2 = 2, (3 + 5)/2 = 4; the integer counter comes from the first expert.
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [2.0, 4.0]
    assert out[n].dtype == torch.int64 and out[n].item() == 4


def test_mixed_float_dtypes_take_the_first_experts_dtype(tmp_path: Path) -> None:
    a = _file(tmp_path, "a", {"w": torch.tensor([1.0], dtype=torch.bfloat16)})
    b = _file(tmp_path, "b", {"w": torch.tensor([2.0], dtype=torch.float32)})
    out = dict(interpolate([a, b], [0.5, 0.5]))
    assert out["w"].dtype == torch.bfloat16 and out["w"].item() == 1.5  # (1 + 2)/2


def test_stream_reads_one_tensor_per_expert_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experts = _gpt2_experts(tmp_path, 3)
    reads: list[tuple[str, str]] = []
    original = Checkpoint.get_tensor

    def counting(self: Checkpoint, key: str) -> torch.Tensor:
        reads.append((self.path.name, key))
        return original(self, key)

    monkeypatch.setattr(Checkpoint, "get_tensor", counting)
    stream = interpolate(experts, [0.2, 0.3, 0.5])
    assert reads == []  # validation reads headers only
    iterator = iter(stream)
    key, _ = next(iterator)
    assert reads == [("e0", key), ("e1", key), ("e2", key)]
    next(iterator)
    assert len(reads) == 6
    with pytest.raises(SoupsError, match="only once"):
        iter(stream)


# ---- key policies -------------------------------------------------------------------------------------------


def test_exact_policy_names_the_expert_and_the_missing_tensor(tmp_path: Path) -> None:
    a = _file(tmp_path, "a", {"x": torch.zeros(2), "y": torch.zeros(1)})
    b = _file(tmp_path, "b", {"x": torch.zeros(2)})
    with pytest.raises(SoupsError, match=r"expert .*b\.safetensors lacks tensor 'y'.*keys=intersection"):
        interpolate([a, b], [0.5, 0.5])
    with pytest.raises(SoupsError, match=r"expert .*b\.safetensors lacks tensor 'y'"):
        interpolate([b, a], [0.5, 0.5])


def test_intersection_drops_and_union_renormalises(tmp_path: Path) -> None:
    a = _file(tmp_path, "a", {"x": torch.tensor([2.0]), "y": torch.tensor([10.0])})
    b = _file(tmp_path, "b", {"x": torch.tensor([4.0])})
    c = _file(tmp_path, "c", {"x": torch.tensor([8.0]), "y": torch.tensor([20.0]), "z": torch.tensor([1.0])})
    lam = [0.2, 0.3, 0.5]

    inter = interpolate([a, b, c], lam, keys="intersection")
    assert inter.plan.dropped == ["y", "z"]
    # x = 0.2*2 + 0.3*4 + 0.5*8 = 0.4 + 1.2 + 4 = 5.6
    assert dict(inter)["x"].item() == pytest.approx(5.6, abs=1e-6)

    union = dict(interpolate([a, b, c], lam, keys="union"))
    assert list(union) == ["x", "y", "z"]
    assert union["x"].item() == pytest.approx(5.6, abs=1e-6)
    # y held by a and c: λ renormalised to 0.2/0.7 and 0.5/0.7: (0.2*10 + 0.5*20)/0.7 = 12/0.7 = 17.142857...
    assert union["y"].item() == pytest.approx(12 / 0.7, rel=1e-6)
    # z held by c alone: copied.
    assert union["z"].item() == 1.0


def test_union_refuses_a_tensor_whose_holders_weigh_zero(tmp_path: Path) -> None:
    a = _file(tmp_path, "a", {"x": torch.zeros(1), "y": torch.zeros(1)})
    b = _file(tmp_path, "b", {"x": torch.zeros(1)})
    with pytest.raises(SoupsError, match=r"tensor 'y' is held only by experts \[0\] whose weights sum to 0"):
        list(interpolate([a, b], [0.0, 1.0], keys="union"))


def test_shape_and_dtype_mismatches_name_expert_and_tensor(tmp_path: Path) -> None:
    a = _file(tmp_path, "a", {"w": torch.zeros(2, 3), "n": torch.tensor(1)})
    b = _file(tmp_path, "b", {"w": torch.zeros(3, 2), "n": torch.tensor(1)})
    c = _file(tmp_path, "c", {"w": torch.zeros(2, 3), "n": torch.tensor(1.0)})
    with pytest.raises(SoupsError, match=r"shape mismatch for tensor 'w': .*b\.safetensors has \(3, 2\), .*a\.safe"):
        interpolate([a, b], [0.5, 0.5])
    with pytest.raises(SoupsError, match=r"dtype mismatch for tensor 'n': .*c\.safetensors has torch\.float32"):
        plan_interpolation([a, c])
    with pytest.raises(SoupsError, match="unknown keys policy 'all'"):
        plan_interpolation([a, c], "all")


# ---- non-finite outputs ---------------------------------------------------------------------------------------


def test_nan_in_an_expert_is_refused_naming_it(tmp_path: Path) -> None:
    a = _file(tmp_path, "a", {"w": torch.ones(2)})
    b = _file(tmp_path, "b", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(SoupsError, match=r"tensor 'w' of expert .*b\.safetensors holds NaN/Inf"):
        list(interpolate([a, b], [0.5, 0.5]))


def test_fp16_overflow_is_refused(tmp_path: Path) -> None:
    # 60000 + 60000 = 120000 > 65504, the largest float16.
    a = _file(tmp_path, "a", {"w": torch.tensor([60000.0], dtype=torch.float16)})
    b = _file(tmp_path, "b", {"w": torch.tensor([60000.0], dtype=torch.float16)})
    with pytest.raises(SoupsError, match=r"tensor 'w' overflows torch\.float16"):
        list(interpolate([a, b], [1.0, 1.0], allow_extrapolation=True))
    # The same sum kept in float32 is fine.
    assert dict(interpolate([a, b], [1.0, 1.0], allow_extrapolation=True, dtype="float32"))["w"].item() == 120000.0
