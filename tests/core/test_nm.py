import pytest
import torch

from maxq.core.nm import from_blocks, nm_mask, parse_nm, to_blocks, topk_mask, validate_nm
from maxq.core.reference import _keep_largest, ref_nm_mask

from ..conftest import PATTERNS

SHAPES = [(8, 16), (6, 32, 3, 3), (4, 16, 1, 1), (3, 48, 5, 3)]


@pytest.mark.parametrize("text, expected", [("2:4", (2, 4)), (" 1 : 16 ", (1, 16)), ("4:8", (4, 8))])
def test_parse_nm(text, expected):
    assert parse_nm(text) == expected


@pytest.mark.parametrize("text", ["4:2", "2:2", "0:4", "2:3x", "2-4", "", "a:b", "-1:4"])
def test_parse_nm_rejects(text):
    with pytest.raises(ValueError):
        parse_nm(text)


def test_validate_nm_messages():
    with pytest.raises(ValueError, match="n must be < m"):
        validate_nm(4, 2)
    with pytest.raises(ValueError, match=">= 1"):
        validate_nm(0, 4)
    with pytest.raises(ValueError, match="int"):
        validate_nm(2.0, 4)


def test_blocks_are_consecutive_input_channels_at_fixed_position():
    o, i, kh, kw = 2, 8, 3, 2
    w = torch.arange(o * i * kh * kw, dtype=torch.float32).reshape(o, i, kh, kw)
    blocks = to_blocks(w, 4)
    assert blocks.shape == (o * kh * kw * 2, 4)
    # First block: filter 0, position (0, 0), input channels 0..3.
    assert torch.equal(blocks[0], w[0, 0:4, 0, 0])
    # Second block: same filter and position, channels 4..7.
    assert torch.equal(blocks[1], w[0, 4:8, 0, 0])
    # Then the next kernel position.
    assert torch.equal(blocks[2], w[0, 0:4, 0, 1])


@pytest.mark.parametrize("shape", SHAPES)
def test_blocks_round_trip(shape):
    w = torch.randn(shape)
    assert torch.equal(from_blocks(to_blocks(w, 4), w.shape), w)


def test_blocks_reject_bad_layouts():
    with pytest.raises(ValueError, match="divisible"):
        to_blocks(torch.randn(4, 6), 4)
    with pytest.raises(ValueError, match="Linear"):
        to_blocks(torch.randn(4, 8, 3), 4)


@pytest.mark.parametrize("length, k", [(4, 2), (16, 1), (9, 0), (9, 9), (33, 17)])
def test_topk_mask_matches_stable_sort(length, k):
    for ints in (False, True):  # integer-valued scores force many ties
        x = torch.randint(0, 3, (50, length)).float() if ints else torch.randn(50, length)
        got = topk_mask(x, k)
        assert torch.equal(got.sum(-1), torch.full((50,), k))
        assert torch.equal(got, _keep_largest(x, k))


def test_topk_mask_ties_go_to_lower_index():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 2.0]])
    assert topk_mask(x, 2).tolist() == [[True, True, False, False], [False, True, True, False]]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n, m", PATTERNS)
def test_nm_mask_keeps_exactly_n_largest(shape, n, m):
    if shape[1] % m:
        pytest.skip("input not divisible")
    w = torch.randn(shape)
    mask = nm_mask(w, n, m)
    blocks, kept = to_blocks(w.abs(), m), to_blocks(mask, m)
    assert torch.equal(kept.sum(-1), torch.full((blocks.shape[0],), n))
    # Every kept magnitude is >= every pruned one in the same block.
    smallest_kept = torch.where(kept, blocks, torch.inf).amin(-1)
    largest_pruned = torch.where(kept, -torch.inf, blocks).amax(-1)
    assert bool((smallest_kept >= largest_pruned).all())
    assert torch.equal(mask, ref_nm_mask(w, n, m))


@pytest.mark.parametrize("n, m", PATTERNS)
def test_nm_mask_ties_deterministic(n, m):
    w = torch.randint(-2, 3, (8, 32, 3, 3)).float()
    first = nm_mask(w, n, m)
    assert torch.equal(first, nm_mask(w.clone(), n, m))
    assert torch.equal(first, ref_nm_mask(w, n, m))
    # All-equal block: the first n channels win.
    w = torch.ones(1, m)
    assert nm_mask(w, n, m)[0].tolist() == [True] * n + [False] * (m - n)
