import pytest
import torch

from maxq.core.queries import axis_query, filter_query, kernel_query, kth_pair, pruned_count
from maxq.core.reference import ref_filter_query, ref_kernel_query, ref_query

from ..conftest import PATTERNS


def _sorted_pair(x, k, dim):
    s = x.sort(dim=dim).values
    return s.narrow(dim, k - 1, 1), s.narrow(dim, k, 1)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("length, k", [(64, 32), (200, 150), (1000, 1), (1000, 999), (37, 20)])
def test_kth_pair_exact(dim, length, k):
    x = torch.randn(12, length).abs() if dim == 1 else torch.randn(length, 12).abs()
    want_lo, want_hi = _sorted_pair(x, k, dim)
    lo, hi = kth_pair(x, k, dim)
    assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)


def test_kth_pair_with_ties():
    x = torch.randint(0, 5, (6, 400)).float()
    for k in (1, 100, 200, 399):
        want = _sorted_pair(x, k, 1)
        got = kth_pair(x, k, 1)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_kth_pair_rejects_bad_rank():
    with pytest.raises(ValueError):
        kth_pair(torch.rand(2, 8), 8)


@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("ties", [False, True])
def test_axis_query_matches_full_sort_reference(n, m, ties):
    x = torch.randint(0, 4, (9, 96)).float() * 0.01 if ties else torch.randn(9, 96).abs() * 0.05
    q, t = axis_query(x, n, m, 0.01)
    ref_q, ref_t = ref_query(x, n, m, 0.01)
    torch.testing.assert_close(t.flatten(), ref_t)
    assert torch.equal(q == 0, ref_q == 0)  # the same entries are cut, including ties by index
    torch.testing.assert_close(q, ref_q)
    k = pruned_count(96, n, m)
    assert torch.equal((q != 0).sum(-1), torch.full((9,), 96 - k))
    kept = q[q != 0]
    assert bool(((kept >= 0.5) & (kept <= 1)).all())


@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("shape", [(16, 32, 3, 3), (8, 16, 1, 1), (12, 16), (4, 32, 5, 5)])
def test_filter_and_kernel_queries_match_reference(n, m, shape):
    a = torch.randn(shape).abs() * 0.03
    qf, _ = filter_query(a, n, m, 0.01)
    torch.testing.assert_close(qf, ref_filter_query(a, n, m, 0.01))
    kq = kernel_query(a, n, m, 0.01)
    if len(shape) == 2 or shape[2] * shape[3] == 1:
        assert kq is None
        assert not ref_kernel_query(a, n, m, 0.01).any()
    else:
        torch.testing.assert_close(kq[0], ref_kernel_query(a, n, m, 0.01))


def test_small_set_prunes_nothing():
    x = torch.rand(3, 3)  # k = floor(2/4 * 3) = 1, fine; 1:2 on a single entry gives k = 0
    q, _ = axis_query(x[:, :1], 1, 2, 0.01)
    assert bool((q > 0.5).all())
