import itertools

import pytest
import torch

from tta.data.openset import mix_ood, split_classes, synthetic_ood
from tta.eval.openset import auroc, fpr_at_tpr, ood_score, openset_metrics


def _brute_auroc(s, ood):
    pairs = [(a, b) for a, b in itertools.product(s[~ood].tolist(), s[ood].tolist())]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def _brute_fpr(s, ood, tpr=0.95):
    best = None
    for t in sorted(set(s.tolist())):
        if (s[~ood] >= t).double().mean() >= tpr:
            best = t  # the highest such threshold wins (sorted ascending)
    return float((s[ood] >= best).double().mean())


def test_auroc_and_fpr95_hand_cases():
    s = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.1])
    ood = torch.tensor([False, False, False, True, True])
    assert auroc(s, ood) == 1.0 and fpr_at_tpr(s, ood) == 0.0
    assert auroc(-s, ood) == 0.0 and fpr_at_tpr(-s, ood) == 1.0
    assert auroc(torch.ones(5), ood) == 0.5
    s2 = torch.tensor([0.9, 0.3, 0.5, 0.4])  # ID 0.9, 0.3; OOD 0.5, 0.4 -> pairs: win, win, lose, lose
    assert auroc(s2, torch.tensor([False, False, True, True])) == 0.5
    # 95% of 2 ID samples needs both: threshold 0.3 accepts both OOD samples
    assert fpr_at_tpr(s2, torch.tensor([False, False, True, True])) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_auroc_and_fpr95_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(60, generator=g) * 3).round()  # many ties
    ood = torch.rand(60, generator=g) < 0.4
    s[ood] -= 1
    assert auroc(s, ood) == pytest.approx(_brute_auroc(s, ood))
    assert fpr_at_tpr(s, ood) == pytest.approx(_brute_fpr(s, ood))


def test_openset_metrics_and_score_choice():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    m = openset_metrics(logits, torch.tensor([0, 0, -1]), torch.tensor([0.9, 0.8, 0.1]),
                        torch.tensor([False, False, True]))
    assert m == {"acc_id": 0.5, "auroc": 1.0, "fpr95": 0.0}

    class Plain:
        pass
    own = Plain()
    own.last_ood_score = torch.tensor([-1.0, -2.0, -3.0])
    torch.testing.assert_close(ood_score(own, logits), own.last_ood_score)
    torch.testing.assert_close(ood_score(Plain(), logits), logits.softmax(1).max(1).values)


def test_mix_ood_ratio_flags_and_class_split():
    x = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 2, 2)
    y = torch.arange(40) % 4
    x_id, y_id, x_ood = split_classes(x, y, ood_classes=[1, 3])
    assert len(x_id) == 20 and len(x_ood) == 20 and set(y_id.tolist()) == {0, 1}
    batches = list(mix_ood(x_id, y_id, x_ood[:3], batch_size=8, ood_ratio=0.25, seed=0))
    assert [len(b[0]) for b in batches] == [8, 8, 8, 3]  # 20 ID = 6+6+6+2; last: 2 ID + round(2*2/6) OOD
    for xb, yb, is_ood in batches[:3]:
        assert int(is_ood.sum()) == 2 and (yb[is_ood] == -1).all() and (yb[~is_ood] >= 0).all()
    assert int(batches[-1][2].sum()) == 1
    all_id = torch.cat([b[0][~b[2]] for b in batches])[:, 0, 0, 0]
    assert sorted(all_id.tolist()) == sorted(x_id[:, 0, 0, 0].tolist())
    img = synthetic_ood(5, 32, seed=1)
    assert img.shape == (5, 3, 32, 32) and img.dtype == torch.uint8
