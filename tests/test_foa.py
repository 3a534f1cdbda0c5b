"""FOA (METHODS-ZOO Z.15): prompt insertion and class-token taps of a timm ViT, the fitness, the CMA-ES
wrapper, and the method end to end on a small randomly initialised ViT (no pretrained ViT exists here)."""
import numpy as np
import pytest
import torch

import tta
from tta.errors import ConfigError
from tta.methods.foa import fitness
from tta.models.common import Normalized
from tta.parts.cmaes import CMAES
from tta.parts.prompts import PromptedViT


def tiny_vit(depth=3):
    import timm
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                            num_classes=10)
    return Normalized(net, (0.5,) * 3, (0.5,) * 3).eval()


def test_taps_without_prompts_are_the_plain_model_and_next_norms():
    model = tiny_vit()
    vit = model.net
    x = torch.rand(4, 3, 32, 32)
    phi, logits = PromptedViT(model).features(x)
    torch.testing.assert_close(logits[0], model(x), rtol=0, atol=0)
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in vit.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    expected = torch.cat([vit.blocks[1].norm1(outs[0][:, 0]), vit.blocks[2].norm1(outs[1][:, 0]),
                          vit.norm(outs[2][:, 0])], 1)
    torch.testing.assert_close(phi[0], expected)


def test_prompts_are_inserted_after_the_class_token_and_batched_per_candidate():
    model = tiny_vit(depth=2)
    pv = PromptedViT(model)
    x = torch.rand(3, 3, 32, 32)
    prompts = torch.randn(4, 2, pv.dim)
    phi, logits = pv.features(x, prompts)
    assert phi.shape == (4, 3, 2 * pv.dim) and logits.shape == (4, 3, 10)
    for k in range(4):  # one candidate at a time gives the same
        phi_k, logits_k = pv.features(x, prompts[k:k + 1])
        torch.testing.assert_close(logits_k[0], logits[k], atol=1e-5, rtol=1e-5)
    vit = model.net
    with torch.no_grad():  # by hand: tokens [CLS, p1, p2, patches...] through the blocks
        h = vit._pos_embed(vit.patch_embed((x - 0.5) / 0.5))
        h = torch.cat([h[:, :1], prompts[0].expand(3, -1, -1), h[:, 1:]], 1)
        h = vit.blocks(h)
        torch.testing.assert_close(vit.head(vit.norm(h)[:, 0]), logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0], logits[1])


def test_fitness_by_hand():
    g = torch.Generator().manual_seed(0)
    phi, logits = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 3, generator=g)
    mu, std = torch.randn(4, generator=g), torch.rand(4, generator=g)
    got = fitness(phi, logits, mu, std, 0.4)
    for k in range(2):
        ent = sum(float(-(p * p.log()).sum()) for p in logits[k].softmax(1))
        gap = float(((phi[k].std(0, unbiased=True) - std) ** 2).sum() + ((phi[k].mean(0) - mu) ** 2).sum())
        assert abs(float(got[k]) - (ent + 0.4 * 5 / 64 * gap)) < 1e-4


def test_cmaes_is_seeded_isolated_and_pycmas_own_sequence():
    import cma
    np.random.seed(7)
    expected_next = np.random.rand()
    np.random.seed(7)
    opt = CMAES(6, popsize=5, seed=2020)
    first = opt.ask()
    opt.tell(first, (first ** 2).sum(1))
    assert np.random.rand() == expected_next  # the process's NumPy stream is untouched
    es = cma.CMAEvolutionStrategy(np.zeros(6), 1.0, {"popsize": 5, "seed": 2020, "verbose": -9})
    assert np.allclose(np.asarray(es.ask()), first)
    opt.reset()
    assert np.array_equal(opt.ask(), first)
    with pytest.raises(ConfigError):
        CMAES(0)


def test_foa_runs_forward_only_resets_and_repeats():
    model = tiny_vit(depth=2)
    source = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = tta.wrap(model, "foa", source_images=source, popsize=6, candidate_batch=4)
    x = torch.rand(3, 8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    outs = [adapter(b) for b in x]
    assert all(o.shape == (8, 10) and torch.isfinite(o).all() for o in outs)
    assert adapter.last["candidates"] == 7 and adapter.counters["forwards"] == 21
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no weight moved
    adapter.reset()
    assert all(torch.equal(adapter(b), o) for b, o in zip(x, outs))
    # the first batch has no history: its output is the best candidate's plain head output
    fresh = tta.wrap(tiny_vit(depth=2), "foa", source_images=source, popsize=6)
    assert torch.equal(fresh(x[0]), outs[0])


def test_foa_errors():
    with pytest.raises(ConfigError, match="source_images"):
        tta.wrap(tiny_vit(), "foa")
    from tta.models import load
    with pytest.raises(ConfigError, match="timm VisionTransformer"):
        tta.wrap(load("cifar_resnet20", checkpoint="none"), "foa", source_images=torch.rand(4, 3, 32, 32))


@pytest.mark.realdata
def test_foa_on_real_cifar_images_with_a_random_vit(cifar_test):
    """Mechanics on real images; the ViT is randomly initialised (no pretrained ViT can be had here), so
    this says nothing about FOA's accuracy."""
    x, _ = cifar_test
    adapter = tta.wrap(tiny_vit(depth=2), "foa", source_images=x[:64], popsize=6)
    out = adapter(x[100:132].float() / 255)
    assert out.shape == (32, 10) and torch.isfinite(out).all()
