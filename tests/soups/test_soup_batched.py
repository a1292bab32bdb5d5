"""`Soup.batched`: K λ in one batched forward equal K sequential `set_weights` forwards (logits and greedy tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_fixtures import VOCAB, load_base, save_adapter, save_base

from soups.simplex import simplex_grid
from soups.soup import Soup
from soups.utils import SoupsError

# 8 λ over 3 experts: the vertices, edges, an interior point, and an off-grid one.
K8 = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0), (0.0, 0.25, 0.75),
      (1 / 3, 1 / 3, 1 / 3), (0.2, 0.3, 0.5), (0.6, 0.1, 0.3)]


def _soup(tmp_path: Path, arch: str, targets: list[str]) -> Soup:
    """Three experts with different ranks, alphas, rslora and target modules."""
    base = save_base(tmp_path, arch)
    adapters = [
        save_adapter(base, tmp_path / "a", 1, target_modules=targets, r=2, lora_alpha=4),
        save_adapter(base, tmp_path / "b", 2, target_modules=targets[:1], r=4, lora_alpha=4, use_rslora=True),
        save_adapter(base, tmp_path / "c", 3, target_modules=targets, r=3, lora_alpha=6),
    ]
    return Soup.from_lora(adapters, load_base(base))


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 5, 3 and 4 (pad id 0) and their attention mask."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (3, 5), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize(
    ("arch", "targets"), [("gpt2", ["c_attn", "c_fc"]), ("llama", ["q_proj", "v_proj", "down_proj"])]
)
def test_batched_logits_and_greedy_tokens_equal_sequential(tmp_path: Path, arch: str, targets: list[str]) -> None:
    soup = _soup(tmp_path, arch, targets)
    ids, mask = _prompts()
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    seq_logits, seq_tokens, seq_beams = [], [], []
    with torch.no_grad():
        for lam in K8:
            model = soup.set_weights(lam)
            seq_logits.append(model(input_ids=ids, attention_mask=mask).logits)
            seq_tokens.append(model.generate(input_ids=ids, attention_mask=mask, **kwargs))
            seq_beams.append(model.generate(input_ids=ids, attention_mask=mask, num_beams=2, num_return_sequences=2,
                                            **kwargs))
    soup.set_weights((0.2, 0.3, 0.5))
    with soup.batched(K8) as batch, torch.no_grad():
        assert batch.model is soup.model and len(batch) == 8
        big_ids, big_mask = batch.expand(ids), batch.expand(mask)
        assert big_ids.shape == (24, 5) and torch.equal(big_ids[3:6], ids)
        logits = batch.split(batch.model(input_ids=big_ids, attention_mask=big_mask).logits)
        tokens = batch.split(batch.model.generate(input_ids=big_ids, attention_mask=big_mask, **kwargs))
        # beams expand every row (repeat_interleave) and reorder within a prompt's beams: λ follows the rows
        beams = batch.split(batch.model.generate(input_ids=big_ids, attention_mask=big_mask, num_beams=2,
                                                 num_return_sequences=2, **kwargs))
    for k, lam in enumerate(K8):
        torch.testing.assert_close(logits[k], seq_logits[k], atol=1e-5, rtol=0, msg=f"logits at λ={lam}")
        assert torch.equal(tokens[k], seq_tokens[k]), f"greedy tokens differ at λ={lam}"
        assert torch.equal(beams[k], seq_beams[k]), f"beam tokens differ at λ={lam}"
    # the 8 mixes are distinct (a test that cannot confuse rows), and the soup is back at its λ afterwards
    assert min((logits[i] - logits[j]).abs().max() for i in range(8) for j in range(i)) > 1e-3
    assert soup.weights == (0.2, 0.3, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(soup.model(input_ids=ids, attention_mask=mask).logits,
                                   soup.set_weights((0.2, 0.3, 0.5))(input_ids=ids, attention_mask=mask).logits)


def test_batched_row_layout_by_hand(tmp_path: Path) -> None:
    """Row j of B rows runs at λ_{j // (B/K)}: a batch of the same prompt at λ = e_1, e_2 gives expert 1 then 2."""
    soup = _soup(tmp_path, "llama", ["q_proj"])
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        e = [soup.set_weights(v)(input_ids=ids).logits[0] for v in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))]
        with soup.batched(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])) as batch:
            out = batch.model(input_ids=ids.repeat(4, 1)).logits  # 4 rows, K = 2: rows 0-1 at e_1, 2-3 at e_2
    for row, expert in ((0, 0), (1, 0), (2, 1), (3, 1)):
        torch.testing.assert_close(out[row], e[expert], atol=1e-5, rtol=0)


def test_batched_on_a_full_grid(tmp_path: Path) -> None:
    """The simplex grid of `soups.pareto` (k = 3: 10 points) in one batch."""
    soup = _soup(tmp_path, "gpt2", ["c_attn"])
    grid = simplex_grid(3, 3).tolist()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        seq = torch.stack([soup.set_weights(lam)(input_ids=ids).logits[0] for lam in grid])
        with soup.batched(grid) as batch:
            out = batch.model(input_ids=batch.expand(ids)).logits
    torch.testing.assert_close(out, seq, atol=1e-5, rtol=0)


def test_batched_errors(tmp_path: Path) -> None:
    soup = _soup(tmp_path, "llama", ["q_proj"])
    with pytest.raises(SoupsError, match="sum"):
        with soup.batched([(0.5, 0.5, 0.5)]):
            pass
    with pytest.raises(SoupsError, match="at least one"):
        with soup.batched([]):
            pass
    with soup.batched(K8[:2]) as batch:
        with pytest.raises(SoupsError, match="batch of 3 rows"), torch.no_grad():
            batch.model(input_ids=torch.ones(3, 2, dtype=torch.long))
        with pytest.raises(SoupsError, match="leave the batched context"):
            soup.set_weights((1.0, 0.0, 0.0))
        with pytest.raises(SoupsError, match="nested"):
            with soup.batched(K8[:2]):
                pass
    soup.set_weights((1.0, 0.0, 0.0))  # usable again after the context
    full = Soup.from_checkpoints([save_base(tmp_path, "llama", 1), save_base(tmp_path, "llama", 2)], progress=False)
    with pytest.raises(SoupsError, match="full checkpoints"):
        with full.batched([(0.5, 0.5)]):
            pass
    base = save_base(tmp_path, "llama")
    saved = [save_adapter(base, tmp_path / n, s, target_modules=["v_proj"], modules_to_save=["lm_head"])
             for n, s in (("m1", 1), ("m2", 2))]
    with pytest.raises(SoupsError, match="modules_to_save"):
        with Soup.from_lora(saved, load_base(base)).batched([(0.5, 0.5)]):
            pass
