"""GTTA (METHODS-ZOO Z.12): the mixup and confidence-gate parts and the AdaIN style-transfer parts against
their formulas on hand-made tensors, the loop against a direct re-implementation, and the method end to end
on cifar_resnet20 with real CIFAR-10 images (reset, seeding, small batches, the style-transfer variant)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta import config
from tta.errors import ConfigError, MissingFileError
from tta.parts.mixup import IGNORE, ConfidenceGate, best_match, best_match_mixup
from tta.parts.style_transfer import (AdaINDecoder, MomentBuffer, StyleEncoder, StyleTransfer, adain,
                                      channel_moments, seeded_decoder)


# ------------------------------------------------------------------------------------------ mixup
def test_best_match_mixup_by_hand():
    p_src = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p_test = torch.tensor([[0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    # inner products: src0 -> (0.25, 0.49, 0.24) -> test 1; src1 -> (0.17, 0.17, 0.52) -> test 2
    assert best_match(p_src, p_test).tolist() == [1, 2]
    x_src = torch.tensor([0.0, 3.0]).view(2, 1, 1, 1)
    x_test = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1, 1)
    mixed = best_match_mixup(x_src, p_src, x_test, p_test, lam=1 / 3)
    assert torch.allclose(mixed.flatten(), torch.tensor([20 / 3, 30 / 3 + 2.0]))


def test_confidence_gate_uses_the_updated_ema():
    gate = ConfidenceGate(momentum=0.9, init=0.9)
    probs = torch.tensor([[0.96, 0.04], [0.03, 0.97], [0.5, 0.5], [0.1, 0.9]])
    labels, keep = gate(probs)
    c1 = 0.9 * 0.9 + 0.1 * (0.96 + 0.97 + 0.5 + 0.9) / 4  # 0.89325, sqrt = 0.94512
    assert float(gate.c_bar) == pytest.approx(c1, abs=1e-6) and gate.threshold == pytest.approx(math.sqrt(c1), abs=1e-6)
    assert labels.tolist() == [0, 1, IGNORE, IGNORE] and keep.tolist() == [True, True, False, False]
    # 0.94 passes sqrt of the updated c_bar (0.9359) but not sqrt of the previous one (0.9451)
    labels, keep = gate(torch.tensor([[0.94, 0.06], [0.5, 0.5]]))
    c2 = 0.9 * c1 + 0.1 * (0.94 + 0.5) / 2
    assert math.sqrt(c2) < 0.94 < math.sqrt(c1)
    assert float(gate.c_bar) == pytest.approx(c2, abs=1e-6) and labels.tolist() == [0, IGNORE]
    gate.reset()
    assert gate.c_bar is None and gate.threshold == pytest.approx(math.sqrt(0.9))
    with pytest.raises(ConfigError):
        ConfidenceGate(momentum=1.5)


# ------------------------------------------------------------------------------------------ style transfer
def test_channel_moments_and_adain_formula():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[0.0, 0.0], [0.0, 4.0]]]])  # (1, 2, 2, 2)
    mean, std = channel_moments(f, eps=0.0)
    assert torch.allclose(mean, torch.tensor([[3.0, 1.0]]))
    assert torch.allclose(std, torch.tensor([[math.sqrt(14 / 3), 2.0]]))  # unbiased: sum sq dev / (n - 1)
    out = adain(f, torch.tensor([[10.0, -1.0]]), torch.tensor([[2.0, 0.5]]), eps=0.0)
    expected0 = (torch.tensor([1.0, 2.0, 3.0, 6.0]) - 3) / math.sqrt(14 / 3) * 2 + 10
    assert torch.allclose(out[0, 0].flatten(), expected0)
    assert torch.allclose(out[0, 1].flatten(), torch.tensor([-1.25, -1.25, -1.25, -0.25]))
    m, s = channel_moments(out, eps=0.0)
    assert torch.allclose(m, torch.tensor([[10.0, -1.0]])) and torch.allclose(s, torch.tensor([[2.0, 0.5]]))


def test_moment_buffer_keeps_the_latest_rows_in_order():
    buf, rows = MomentBuffer(5), []
    for n in (2, 1, 3, 4):  # grows 2 -> 4 -> 5, then wraps around
        new = torch.arange(len(rows), len(rows) + n, dtype=torch.float32).view(-1, 1).repeat(1, 2)
        buf.append(new)
        rows += new[:, 0].tolist()
        assert len(buf) == min(len(rows), 5)
        k = len(buf)
        assert buf.latest(k)[:, 0].tolist() == rows[-k:]
        assert buf.latest(1)[:, 0].tolist() == rows[-1:]
    drawn = buf.sample(200, torch.Generator().manual_seed(0))[:, 0]
    assert set(drawn.tolist()) == set(rows[-5:])
    with pytest.raises(ValueError):
        buf.latest(6)
    buf.append(torch.arange(7.0).view(-1, 1).repeat(1, 2))  # more than the capacity at once
    assert buf.latest(5)[:, 0].tolist() == [2, 3, 4, 5, 6]
    buf.clear()
    assert len(buf) == 0


def test_decoder_mirrors_vgg_and_adds_the_skip():
    dec = AdaINDecoder()
    convs = [(m.in_channels, m.out_channels) for m in dec.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(512, 256), (256, 256), (256, 256), (256, 256), (256, 128), (128, 128), (128, 64),
                     (64, 64), (64, 3)]
    tiny = seeded_decoder(widths=(8, 4), repeats=(1, 1))
    assert torch.equal(tiny.body[0].weight, seeded_decoder(widths=(8, 4), repeats=(1, 1)).body[0].weight)
    content, skip = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = tiny(content, skip)
    assert out.shape == (2, 3, 8, 8) and 0 < float(out.min()) and float(out.max()) < 1
    assert torch.equal(out, tiny.head(tiny.body(content) + skip))
    with pytest.raises(ConfigError):
        AdaINDecoder(widths=(8, 4), repeats=(1,))


def tiny_encoder(seed=0):
    g = torch.Generator().manual_seed(seed)
    c1, c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
    for conv in (c1, c2):
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
            conv.bias.copy_(torch.rand(conv.bias.shape, generator=g) * 0.1)
    return StyleEncoder([nn.Sequential(c1, nn.ReLU()), nn.Sequential(nn.MaxPool2d(2), c2, nn.ReLU())],
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def tiny_style(**kw):
    return StyleTransfer(tiny_encoder(), seeded_decoder(widths=(8, 4), repeats=(1, 1)), **kw)


def test_style_transfer_losses_match_a_direct_computation():
    st = tiny_style(style_weight=0.1)
    x, styles = torch.rand(3, 3, 8, 8), torch.rand(5, 3, 8, 8)
    assert not any(p.requires_grad for p in st.encoder.parameters())
    st.remember(styles)
    style = st.buffer.latest(3)  # the moments of styles[2:5]

    def moments(f):  # direct: mean and sqrt(unbiased var + eps) per image and channel
        n = f.shape[2] * f.shape[3]
        mu = f.sum((2, 3)) / n
        return mu, (((f - mu[..., None, None]) ** 2).sum((2, 3)) / (n - 1) + 1e-5).sqrt()

    enc = st.encoder
    z = (styles[2:5] - 0.5) / 0.25
    s1 = enc.stages[0](z)
    s2 = enc.stages[1](s1)
    (m1, d1), (m2, d2) = moments(s1), moments(s2)
    assert torch.allclose(style, torch.cat([m1, d1, m2, d2], 1), atol=1e-5)
    c1 = enc.stages[0]((x - 0.5) / 0.25)
    c2 = enc.stages[1](c1)

    def norm(f, m, d):
        mu, sd = moments(f)
        return (f - mu[..., None, None]) / sd[..., None, None] * d[..., None, None] + m[..., None, None]

    t2 = norm(c2, m2, d2)
    image = st.decoder.head(st.decoder.body(t2) + norm(c1, m1, d1))
    g1 = enc.stages[0]((image - 0.5) / 0.25)
    g2 = enc.stages[1](g1)
    (gm1, gd1), (gm2, gd2) = moments(g1), moments(g2)
    content = ((g2 - t2) ** 2).mean()
    style_loss = sum(((a - b) ** 2).mean() for a, b in [(gm1, m1), (gd1, d1), (gm2, m2), (gd2, d2)])
    got_content, got_style = st.losses(x, style)
    assert torch.allclose(got_content, content, atol=1e-5) and torch.allclose(got_style, style_loss, atol=1e-5)
    assert torch.allclose(st.render(x, style), image, atol=1e-6)
    before = st.decoder.body[0].weight.clone()
    value = st.step(x, style)
    assert value == pytest.approx(float((content + 0.1 * style_loss).detach()), rel=1e-5)
    assert not torch.equal(before, st.decoder.body[0].weight)


def test_pretraining_is_cached_by_weights_and_source_set(monkeypatch, tmp_path):
    monkeypatch.setenv("TTA_CACHE_DIR", str(tmp_path))
    images = (torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    first = tiny_style()
    start = copy.deepcopy(first.decoder.state_dict())
    first.pretrain(images, steps=3, batch_size=4, seed=1)
    assert not first.from_cache and len(first.buffer) == 0
    assert not torch.equal(start["body.0.weight"], first.decoder.body[0].weight)
    assert len(list((tmp_path / "gtta_adain").glob("decoder-*.pt"))) == 1
    second = tiny_style()
    second.pretrain(images, steps=3, batch_size=4, seed=1)
    assert second.from_cache
    for k, v in first.decoder.state_dict().items():
        assert torch.equal(v, second.decoder.state_dict()[k])
    other = tiny_style()
    other.pretrain(images[:8], steps=3, batch_size=4, seed=1)  # another source set: another key
    assert not other.from_cache and len(list((tmp_path / "gtta_adain").glob("decoder-*.pt"))) == 2
    fresh = tiny_style()
    fresh.pretrain(images, steps=3, batch_size=4, seed=1, cache=False)  # retrained: same result as cached
    for k, v in first.decoder.state_dict().items():
        assert torch.equal(v, fresh.decoder.state_dict()[k])


def test_vgg_encoder_offline_names_the_weight_file(monkeypatch, tmp_path):
    import urllib.error

    import torch.hub
    from tta.parts.style_transfer import vgg19_encoder
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    with pytest.raises(MissingFileError) as info:
        vgg19_encoder()
    assert "vgg19-dcbb9e9d.pth" in str(info.value) and str(tmp_path / "hub" / "checkpoints") in str(info.value)


# ------------------------------------------------------------------------------------------ the loop
def source_set(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 255).to(torch.uint8), torch.randint(0, 10, (n,), generator=g)


def test_loop_matches_a_direct_implementation(tiny_bn_model):
    """Two batches against the reference's steps written out plainly (BN buffers deleted, train mode)."""
    images, labels = source_set()
    with torch.no_grad():
        tiny_bn_model[-1].weight.mul_(20)  # confident enough that the gate keeps some samples and not others
    ref = copy.deepcopy(tiny_bn_model).train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    adapter = tta.wrap(tiny_bn_model, "gtta", source_images=images, source_labels=labels, source_batch_size=12,
                       lr=1e-3, seed=3, confidence_init=0.5)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    g, c_bar = torch.Generator().manual_seed(5), torch.tensor(0.5)
    for b in range(2):
        x = torch.rand(10, 3, 16, 16, generator=g)
        idx = order[12 * b:12 * b + 12][:10]
        xs, ys = images[idx].float() / 255, labels[idx]
        with torch.no_grad():
            p = ref(x).softmax(1)
            conf, yhat = p.max(1)
            c_bar = 0.9 * c_bar + 0.1 * conf.mean()
            yhat[conf < c_bar.sqrt()] = -1
            ps = ref(xs).softmax(1)
            m = [max(range(10), key=lambda i: float((ps[j] * p[i]).sum())) for j in range(10)]
            mixed = xs / 3 * 2 + x[m] / 3
        F.cross_entropy(ref(mixed), ys).backward()
        opt.step()
        opt.zero_grad()
        expected = ref(x)
        F.cross_entropy(expected, yhat, ignore_index=-1).backward()
        opt.step()
        opt.zero_grad()
        got = adapter(x)
        assert 0 < adapter.last["selected"] == int((yhat >= 0).sum()) < 10
        assert torch.allclose(got, expected, atol=1e-5)
    for (name, p), q in zip(adapter.model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    assert adapter.counters["steps"] == 4 and adapter.optimizer.state[adapter.params[0]]["step"] == 4
    assert adapter.source._pos == 24  # one source batch per test batch


def test_all_ignored_takes_no_target_step(tiny_bn_model):
    images, labels = source_set()
    adapter = tta.wrap(tiny_bn_model, "gtta", source_images=images, source_labels=labels, source_batch_size=8,
                       confidence_momentum=1.0, confidence_init=1.0)  # threshold 1: every label ignored
    out = adapter(torch.rand(8, 3, 16, 16))
    assert torch.isfinite(out).all() and adapter.last["selected"] == 0 and not adapter.last["stepped"]
    assert adapter.counters["empty"] == 1 and adapter.counters["steps"] == 1  # the source step only
    assert all(torch.isfinite(p).all() for p in adapter.model.parameters())
    out.add_(1)  # an ordinary tensor, even though it came from an inference-mode forward


def test_bad_options_are_clear_errors(tiny_bn_model):
    images, labels = source_set()
    with pytest.raises(ConfigError, match="source_images and source_labels"):
        tta.wrap(tiny_bn_model, "gtta")
    with pytest.raises(ConfigError, match="mixup_lambda"):
        tta.wrap(tiny_bn_model, "gtta", source_images=images, source_labels=labels, mixup_lambda=2.0)
    with pytest.raises(ConfigError, match="adain_buffer"):
        tta.wrap(tiny_bn_model, "gtta", source_images=images, source_labels=labels, style_transfer=True,
                 style_encoder=tiny_encoder(), adain_buffer=8, source_batch_size=16)
    with pytest.raises(ConfigError, match="style_transfer is off"):
        tta.wrap(tiny_bn_model, "gtta", source_images=images, source_labels=labels, style_encoder=tiny_encoder())


def test_configs_load():
    for path in ("configs/cifar10c/gtta.yaml", "configs/imagenetc/gtta.yaml"):
        cfg = config.load(path)
        assert cfg["method"]["name"] == "gtta" and cfg["method"]["lr"] == 1e-5
    assert config.load("configs/imagenetc/gtta.yaml")["method"]["style_transfer"] is True


# ------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def batches(dev_domains):
    noise, contrast = dev_domains["noise"], dev_domains["contrast"]
    return [noise[:32], noise[32:64], contrast[:32], contrast[32:64]]


@pytest.fixture(scope="module")
def source(data_dir):
    from tta.data.datasets import load_cifar10
    x, y = load_cifar10(data_dir, "train")
    return x[:256], y[:256]


def make(data_dir, source, **kw):
    return tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), "gtta", source_images=source[0],
                    source_labels=source[1], seed=1, **kw)


def run(adapter, batches):
    outs, lasts = [], []
    for x in batches:
        outs.append(adapter(x))
        lasts.append(dict(adapter.last))
    return outs, lasts


@pytest.mark.realdata
def test_gtta_runs_resets_and_is_seeded(batches, data_dir, source):
    adapter = make(data_dir, source, source_batch_size=32)
    start = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    outs, lasts = run(adapter, batches)
    assert all(o.shape == (32, 10) and torch.isfinite(o).all() for o in outs)
    c = adapter.counters
    assert c["batches"] == 4 and c["backward"] == c["steps"] == 8 - c["empty"] and c["nonfinite"] == 0
    assert all(0 < last["selected"] < 32 for last in lasts)
    assert all(not torch.equal(v, start[k]) for k, v in adapter.model.named_parameters())  # every weight moves

    adapter.reset()  # weights, Adam, gate EMA, source position
    assert all(torch.equal(v, start[k]) for k, v in adapter.model.state_dict().items())
    again, lasts_again = run(adapter, batches[:2])
    assert all(torch.equal(a, b) for a, b in zip(outs, again)) and lasts_again == lasts[:2]
    fresh, _ = run(make(data_dir, source, source_batch_size=32), batches[:2])
    assert all(torch.equal(a, b) for a, b in zip(outs, fresh))


@pytest.mark.realdata
def test_gtta_small_batches_and_mid_stream_reset(batches, data_dir, source):
    adapter = make(data_dir, source)  # source batches of 200, truncated to the test batch
    small = [batches[0][:16], batches[0][16:18], batches[2][:16]]  # a sliding-window size, a tiny last batch
    outs, _ = run(adapter, small)
    assert [o.shape[0] for o in outs] == [16, 2, 16] and all(torch.isfinite(o).all() for o in outs)
    assert adapter.source._pos == 200 and adapter.source._order.numel() == 256
    adapter.reset()  # e.g. reset_each_shift
    assert torch.equal(adapter(small[0]), outs[0])


@pytest.mark.realdata
def test_gtta_style_transfer_variant(batches, data_dir, source, monkeypatch, tmp_path):
    monkeypatch.setenv("TTA_CACHE_DIR", str(tmp_path))
    kw = dict(style_transfer=True, style_encoder=tiny_encoder(),
              style_decoder=seeded_decoder(widths=(8, 4), repeats=(1, 1)), adain_pretrain_steps=2, source_batch_size=16)
    adapter = make(data_dir, source, **kw)
    assert not adapter.style.from_cache
    decoder = {k: v.clone() for k, v in adapter.style.decoder.state_dict().items()}
    outs, lasts = run(adapter, batches[:2])
    assert all(o.shape == (32, 10) and torch.isfinite(o).all() for o in outs)
    assert len(adapter.style.buffer) == 64 and adapter.source._pos == 4 * 16  # 2 source draws per batch
    assert not torch.equal(decoder["body.0.weight"], adapter.style.decoder.body[0].weight)
    adapter.reset()
    assert len(adapter.style.buffer) == 0 and not adapter.style.optimizer.state
    assert all(torch.equal(v, decoder[k]) for k, v in adapter.style.decoder.state_dict().items())
    again, lasts_again = run(adapter, batches[:2])
    assert all(torch.equal(a, b) for a, b in zip(outs, again)) and lasts_again == lasts
    kw.update(style_encoder=tiny_encoder(), style_decoder=seeded_decoder(widths=(8, 4), repeats=(1, 1)))
    cached = make(data_dir, source, **kw)
    assert cached.style.from_cache
    assert all(torch.equal(a, b) for a, b in zip(outs, run(cached, batches[:2])[0]))
