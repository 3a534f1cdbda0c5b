"""EATA-C's parts (tta/parts/subnet.py) against their formulas on hand-made tensors."""
import copy

import torch
from torch import nn

import tta
from tta.adapter import Batch
from tta.parts.subnet import ChannelDropout, MinMaxEntropy, SubnetConsistency


class _Holder:
    def __init__(self, model):
        self.model, self.generator = model, torch.Generator().manual_seed(0)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 4, 5)).eval()


def test_channel_dropout_drops_whole_channels_per_sample_only_inside_sampled():
    net = _net()
    drop = ChannelDropout(0.5)
    holder = _Holder(net)
    drop.bind(holder)
    drop.bind(holder)  # idempotent: one hook per layer
    assert len(net[1]._forward_hooks) == 1
    x = torch.rand(8, 3, 2, 2)
    full = net(x)
    with drop.sampled(holder.generator, x.device):
        sub = net(x)
    assert not torch.equal(sub, full)
    assert torch.equal(net(x), full)  # outside the block: the full network again
    g = torch.Generator().manual_seed(0)
    with drop.sampled(g, x.device):
        once = net(x)
    with drop.sampled(torch.Generator().manual_seed(0), x.device):
        again = net(x)
    assert torch.equal(once, again)  # seeded by the adapter's generator


def test_channel_dropout_mask_values():
    drop = ChannelDropout(0.25)
    drop._gen = torch.Generator().manual_seed(3)
    out = drop._hook(None, None, torch.ones(4, 7, 3, 3))
    per_channel = out[:, :, 0, 0]
    assert set(per_channel.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.equal(out, per_channel[:, :, None, None].expand_as(out))  # whole channels


def test_min_max_entropy_and_consistency_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    sub = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)  # agrees, then disagrees
    batch = Batch(torch.zeros(2, 3, 1, 1), logits, None)
    batch.extras["sub_logits"] = sub
    drop = ChannelDropout(0.1)
    h = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    got = MinMaxEntropy(drop, max_weight=0.5)(batch)
    torch.testing.assert_close(got, torch.stack([h[0], -0.5 * h[1]]))
    assert batch.extras["agree"].tolist() == [True, False]
    p, q = logits.softmax(1).detach(), sub.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    term = SubnetConsistency(drop, weight=2.0)(batch)
    torch.testing.assert_close(term, 2.0 * kl)
    term.backward()
    assert logits.grad is None and sub.grad.abs().sum() > 0  # the full network is the target


def test_eata_c_runs_resets_and_repeats(tiny_bn_model):
    x = torch.rand(3, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    adapter = tta.wrap(copy.deepcopy(tiny_bn_model), "eata_c", fisher_data=x[0], fisher_n=16,
                       fisher_batch_size=16, margin_frac=1.0, d_margin=1.01)
    outs = [adapter(b) for b in x]
    assert adapter.counters["steps"] == 3 and all(torch.isfinite(o).all() for o in outs)
    adapter.reset()
    assert all(torch.equal(adapter(b), o) for b, o in zip(x, outs))
