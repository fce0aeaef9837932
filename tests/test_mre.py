"Token labels and Eq. 4 against brute-force loops."
import numpy as np
import pytest
import torch
from mgab.mre import labels2tokens, mask_bias, relation_factors, factor_weights, relation_matrix


@pytest.mark.parametrize("H,W,gh,gw", [(32, 32, 4, 4), (30, 45, 4, 6), (17, 23, 5, 3)])
def test_labels2tokens_brute_force(H, W, gh, gw):
    rng = np.random.default_rng(H * W)
    lm = rng.integers(0, 6, (2, H, W))
    near, maj = labels2tokens(lm, (gh, gw)), labels2tokens(lm, (gh, gw), "majority")
    for b in range(2):
        for i in range(gh):
            for j in range(gw):
                assert near[b, i * gw + j] == lm[b, (2 * i + 1) * H // (2 * gh), (2 * j + 1) * W // (2 * gw)]
                if H % gh == 0 and W % gw == 0:
                    patch = lm[b, i * H // gh:(i + 1) * H // gh, j * W // gw:(j + 1) * W // gw]
                    counts = np.bincount(patch.ravel(), minlength=6)
                    assert maj[b, i * gw + j] == counts.argmax()  # first maximum: smaller label wins ties


def test_majority_tie_goes_to_smaller_label():
    lm = torch.zeros(4, 4, dtype=torch.long)
    lm[:, 2:] = 3  # half background, half mask 3, one patch
    assert labels2tokens(lm, 1, "majority").item() == 0
    lm[:, 1] = 2; lm[:, 2:] = 2
    assert labels2tokens(lm, 1, "majority").item() == 2


def test_mask_bias_brute_force():
    g = torch.Generator().manual_seed(0)
    m = torch.randint(0, 4, (2, 13), generator=g)
    up, un = torch.randn(3, generator=g), torch.randn(3, generator=g)
    b = mask_bias(m, up, un)
    for bi in range(2):
        for h in range(3):
            for i in range(13):
                for j in range(13):
                    mi, mj = m[bi, i].item(), m[bi, j].item()
                    want = up[h] if (mi == mj and mi != 0) else un[h] if (mi != 0 and mj != 0) else 0.
                    assert b[bi, h, i, j] == want
    rel = relation_matrix(m)
    assert set(rel.unique().tolist()) <= {-1, 0, 1} and (rel == 0).any() and (rel == 1).any() and (rel == -1).any()


@pytest.mark.parametrize("K", [1, 5, 8])
def test_low_rank_form_equals_eq4(K):
    g = torch.Generator().manual_seed(K)
    m = torch.randint(0, K + 1, (3, 40), generator=g)
    up, un = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    f = relation_factors(m, K, torch.float64)[:, None]
    low = (f * factor_weights(up, un, K)[None, :, None]) @ f.transpose(-1, -2)
    torch.testing.assert_close(low, mask_bias(m, up, un))
