"""RoTTA (METHODS-ZOO Z.6): the CSTU memory against hand-worked cases and a direct transcription of its
rules, robust BN against its formula, the update against a by-hand step, and the loop on real data."""
import copy
import inspect
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tta import config
from tta.errors import ConfigError, InputError
from tta.parts.augment import augment_ct
from tta.parts.memory import CSTUMemory, timeliness
from tta.parts.robust_bn import RobustStats, robust_layers, set_robust_training

# the four 64-image real-data batches (noise, noise, contrast, contrast) of the other method tests


def img(v: float) -> torch.Tensor:
    return torch.full((1, 2, 2), float(v))


def stored(mem):
    """(label, pixel value, age) of every item, in contents() order."""
    c = mem.contents()
    return [(int(y), float(x[0, 0, 0]), int(g)) for x, y, g in zip(c.images, c.labels, c.ages)]


# ------------------------------------------------------------------------------------------ memory
def test_timeliness_weight_formula():
    w = timeliness(torch.tensor([0, 64, 128]), 64)
    assert torch.allclose(w, torch.tensor([0.5, math.exp(-1) / (1 + math.exp(-1)), math.exp(-2) / (1 + math.exp(-2))]))


def test_score_formula_uses_raw_age_and_ln_c():
    mem = CSTUMemory(capacity=8, num_classes=4, lambda_t=2.0, lambda_u=3.0)
    assert mem.score(4, 0.7) == pytest.approx(2.0 / (1 + math.exp(-4 / 8)) + 3.0 * 0.7 / math.log(4))
    assert mem.quota == 2.0 and CSTUMemory(64, 10).quota == 6.4


def test_every_item_ages_after_every_add_accepted_or_not():
    mem = CSTUMemory(capacity=4, num_classes=2)  # quota 2
    assert mem.add(img(1), 0, 0.5) and mem.add(img(2), 0, 0.5)
    assert stored(mem) == [(0, 1.0, 2), (0, 2.0, 1)]  # the new item reaches age 1 at once
    # class 0 is at its quota: its own items are the victims; a more uncertain newcomer outscores the best
    # of them (0.5/(1+e^{-2/4})... < 1/2 + 2/ln 2), so it is rejected, and everything still ages
    assert not mem.add(img(3), 0, 2.0)
    assert stored(mem) == [(0, 1.0, 3), (0, 2.0, 2)] and len(mem) == 2
    # with the same uncertainty the newcomer (age 0) scores below both: the oldest (highest score) leaves
    assert mem.add(img(4), 0, 0.5)
    assert stored(mem) == [(0, 2.0, 3), (0, 4.0, 1)]


def test_float_quota_lets_a_class_reach_the_next_integer():
    mem = CSTUMemory(capacity=64, num_classes=10)  # quota 6.4
    for i in range(7):
        assert mem.add(img(i), 3, 0.0)  # 6 < 6.4: the 7th is still under quota and the memory not full
    assert mem.occupancy()[3] == 7
    # 7 >= 6.4: the class is its own victim; an older, certain item scores 1/(1+e^{-g/64}) against a new
    # item's 0.5 + u/ln 10: a very uncertain newcomer loses, a certain one replaces the oldest
    assert not mem.add(img(7), 3, 2.0)
    assert mem.add(img(8), 3, 0.0)
    assert [v for _, v, _ in stored(mem)] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]  # item 0 (oldest) evicted


def test_a_class_at_quota_is_its_own_victim_full_memory_or_not():
    mem = CSTUMemory(capacity=6, num_classes=3, lambda_t=0.0)  # quota 2; score = u / ln 3
    mem.add(img(1), 2, 0.9)
    mem.add(img(2), 2, 0.1)
    mem.add(img(3), 0, 0.2)
    mem.add(img(4), 0, 0.3)
    mem.add(img(5), 0, 0.8)  # class 0 at quota: victim 0 holds 0.2, 0.3 -> candidate 0.3 > 0.8? no: rejected
    assert mem.occupancy() == [2, 0, 2]
    mem.add(img(6), 1, 0.5)
    mem.add(img(7), 1, 0.5)
    assert len(mem) == 6 and mem.occupancy() == [2, 2, 2]
    # class 1 is at quota -> its own victim; full memory does not matter then
    assert not mem.add(img(8), 1, 0.6)
    # a new class-0 item: at quota, victim {0}: candidate 0.3 (largest) > 0.25 -> replaced
    assert mem.add(img(9), 0, 0.25)
    assert stored(mem)[:2] == [(0, 3.0, 7), (0, 9.0, 1)]  # 9 adds so far, item 3 was the 3rd


def test_full_memory_and_class_under_quota_victims_are_the_majority_classes():
    mem = CSTUMemory(capacity=5, num_classes=2, lambda_t=0.0)  # quota 2.5: a class may hold 3
    for v, y, u in [(1, 0, 0.4), (2, 0, 0.6), (3, 0, 0.5), (4, 1, 0.9), (5, 1, 0.1)]:
        assert mem.add(img(v), y, u)
    assert mem.occupancy() == [3, 2]
    # class 1 holds 2 < 2.5 but the memory is full: victims = the fullest class (0); its best is 0.6
    assert not mem.add(img(6), 1, 0.7)  # 0.6 > 0.7 fails: rejected
    assert mem.add(img(7), 1, 0.3)  # 0.6 > 0.3: item 2 leaves, class 1 gains
    assert [v for _, v, _ in stored(mem)] == [1.0, 3.0, 4.0, 5.0, 7.0]


def test_ties_go_to_the_last_item_scanned_and_equal_score_rejects():
    mem = CSTUMemory(capacity=4, num_classes=2, lambda_t=0.0)  # quota 2
    mem.add(img(1), 0, 0.5)
    mem.add(img(2), 0, 0.5)
    assert not mem.add(img(3), 0, 0.5)  # candidate 0.5 is not > 0.5
    assert mem.add(img(4), 0, 0.1)  # tie between items 1 and 2: the later one (2) goes
    assert [v for _, v, _ in stored(mem)] == [1.0, 4.0]
    # across classes: a tie between the fullest classes 0 and 1 evicts from class 1 (scanned last)
    mem = CSTUMemory(capacity=4, num_classes=3, lambda_t=0.0)  # quota 4/3: classes may hold 2
    for v, y in [(1, 1), (2, 0), (3, 1), (4, 0)]:
        mem.add(img(v), y, 0.5)
    assert mem.add(img(5), 2, 0.1)
    assert stored(mem) == [(0, 2.0, 4), (0, 4.0, 2), (1, 1.0, 5), (2, 5.0, 1)]


def test_contents_order_copies_and_reset():
    mem = CSTUMemory(capacity=8, num_classes=3)
    x = torch.rand(4, 3, 2, 2)
    assert mem.add_batch(x, torch.tensor([2, 0, 2, 1]), torch.tensor([0.1, 0.2, 0.3, 0.4])) == [True] * 4
    c = mem.contents()
    assert c.labels.tolist() == [0, 1, 2, 2] and c.ages.tolist() == [3, 1, 4, 2]
    assert torch.equal(c.images, x[[1, 3, 0, 2]]) and torch.allclose(c.uncertainties, torch.tensor([.2, .4, .1, .3]))
    x.zero_()  # the caller reuses its buffer: the memory kept copies
    assert torch.equal(mem.contents().images, c.images)
    mem.reset()
    assert len(mem) == 0 and mem.occupancy() == [0, 0, 0]
    with pytest.raises(InputError, match="empty"):
        mem.contents()
    with pytest.raises(InputError, match="label"):
        mem.add(img(0), 3, 0.1)
    with pytest.raises(ConfigError):
        CSTUMemory(capacity=0)
    with pytest.raises(ConfigError):
        CSTUMemory(num_classes=1)


class DirectCSTU:
    """Z.6's rules transcribed literally: per-item ages incremented after every add, scores recomputed."""

    def __init__(self, m, c):
        self.m, self.c, self.data = m, c, [[] for _ in range(c)]  # items: [value, u, age]

    def score(self, age, u):
        return 1 / (1 + math.exp(-age / self.m)) + u / math.log(self.c)

    def add(self, v, y, u):
        occ = [len(d) for d in self.data]
        if occ[y] < self.m / self.c and sum(occ) < self.m:
            ok = True
        else:
            victims = [y] if occ[y] >= self.m / self.c else [k for k in range(self.c) if occ[k] == max(occ)]
            scored = [(self.score(it[2], it[1]), k, i) for k in victims for i, it in enumerate(self.data[k])]
            best = max(s for s, _, _ in scored)
            _, k, i = [t for t in scored if t[0] == best][-1]
            ok = best > self.score(0, u)
            if ok:
                del self.data[k][i]
        if ok:
            self.data[y].append([v, u, 0])
        for d in self.data:
            for it in d:
                it[2] += 1
        return ok


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memory_matches_a_direct_transcription_on_a_long_random_stream(seed):
    rng = random.Random(seed)
    mem, direct = CSTUMemory(16, 5), DirectCSTU(16, 5)
    for step in range(600):
        y = min(int(rng.expovariate(0.6)), 4)  # class-imbalanced, as a correlated stream
        u = rng.choice([0.1, 0.5, rng.random() * math.log(5)])
        assert mem.add(img(step), y, u) == direct.add(step, y, u)
    want = [(k, float(v), g) for k, d in enumerate(direct.data) for v, _, g in d]
    assert stored(mem) == want and len(mem) == 16


# ---------------------------------------------------------------------------------------- robust BN
def direct_robust(x, mean_bar, var_bar, w, b, a, eps):
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu_b = x.mean(dims)
    var_b = ((x - mu_b.view(shape)) ** 2).mean(dims)
    mu, var = (1 - a) * mean_bar + a * mu_b, (1 - a) * var_bar + a * var_b
    return (x - mu.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape), mu, var


@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (7, 3), (5, 3, 4)])
def test_robust_bn_train_mode_matches_the_formula_with_gradients(shape):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3) if len(shape) == 4 else nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        bn.weight.copy_(torch.tensor([1.5, 0.7, -0.3]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    ref = copy.deepcopy(bn)
    net = RobustStats(alpha=0.2)(nn.Sequential(bn))
    assert net[0].training and net[0].state_dict().keys() == ref.state_dict().keys()
    x = (torch.randn(shape) * 2 + 1).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    out = net(x)
    want, mu, var = direct_robust(x2, ref.running_mean, ref.running_var, ref.weight, ref.bias, 0.2, bn.eps)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(bn.running_mean, mu.detach())
    torch.testing.assert_close(bn.running_var, var.detach())
    g = torch.randn(shape)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad)
    # the gradient really flows through the batch moments: with constant moments it would be g * w / sigma
    view = [1, -1] + [1] * (len(shape) - 2)
    assert not torch.allclose(x.grad, g * (ref.weight / torch.sqrt(var + bn.eps)).detach().view(view), atol=1e-4)


def test_robust_bn_eval_mode_uses_the_stored_pair_and_moves_nothing():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        bn.weight.copy_(torch.tensor([2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.5]))
    net = RobustStats()(nn.Sequential(bn))
    set_robust_training(net, False)
    x = torch.randn(3, 2, 2, 2)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    out = net(x)
    c = lambda *v: torch.tensor(v).view(1, 2, 1, 1)  # noqa: E731
    want = (x - c(1.0, -1.0)) / torch.sqrt(c(4.0, 0.25) + 1e-5) * c(2.0, 1.0) + c(0.0, 0.5)
    torch.testing.assert_close(out, want)
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    set_robust_training(net, True)
    net(x)
    assert not torch.equal(bn.running_mean, before["running_mean"])


def test_robust_mode_configures_only_norm_layers_and_copies_keep_their_own_pair(tiny_bn_model):
    tiny_bn_model.add_module("drop", nn.Dropout(0.5))
    model = RobustStats(0.05)(tiny_bn_model)
    assert len(list(robust_layers(model))) == 2 and not model.drop.training
    twin = copy.deepcopy(model)
    model(torch.rand(4, 3, 8, 8))
    assert not torch.equal(model[1].running_mean, twin[1].running_mean)
    set_robust_training(twin, False)
    assert not twin[1].training and model[1].training and not twin.drop.training
    with pytest.raises(ConfigError, match="alpha"):
        RobustStats(1.5)
    with pytest.raises(ConfigError, match="BatchNorm"):
        RobustStats()(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="running"):
        RobustStats()(nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False)))


# ------------------------------------------------------------------------------------------ the loop
def test_registration_and_options(tiny_bn_model):
    info = tta.methods.info("rotta")
    assert (info.cost.grad, info.cost.backward, info.cost.nograd) == (1, 1, 2) and info.source_data is None
    a = tta.wrap(copy.deepcopy(tiny_bn_model), "rotta")
    assert a.param_names == ["1.weight", "1.bias", "4.weight", "4.bias"]  # robust BN affine only
    assert isinstance(a.optimizer, torch.optim.Adam) and a.optimizer.defaults["lr"] == 1e-3
    assert not any(p.requires_grad for p in a.teacher.parameters())
    for bad, match in [({"steps": 2}, "steps"), ({"update_frequency": 0}, "update_frequency"),
                       ({"nu": 1.5}, "nu"), ({"memory_size": 0}, "capacity"), ({"alpha": -0.1}, "alpha")]:
        with pytest.raises(ConfigError, match=match):
            tta.wrap(copy.deepcopy(tiny_bn_model), "rotta", **bad)


def test_updates_follow_a_global_sample_counter_that_only_reset_zeroes(tiny_bn_model):
    a = tta.wrap(tiny_bn_model, "rotta")  # an update every 64 samples
    x = torch.rand(50, 3, 8, 8)
    steps = []
    for _ in range(4):
        a(x)
        steps.append(a.counters["steps"])
    assert steps == [0, 1, 2, 3] and a.seen == 200  # after samples 64 (batch 2), 128 (batch 3), 192 (batch 4)
    assert a.counters["backward"] == 3
    a.reset()
    assert a.seen == 0 and a.memory is None
    a(x)
    assert a.counters["steps"] == 3  # 50 more samples: no update yet


def test_prediction_is_the_eval_teacher_before_the_batch_updates(tiny_bn_model):
    a = tta.wrap(tiny_bn_model, "rotta", update_frequency=4)
    x = torch.rand(12, 3, 8, 8)
    a(x)  # three updates: the teacher has moved
    teacher = copy.deepcopy(a.teacher)
    set_robust_training(teacher, False)
    with torch.no_grad():
        want = teacher(x)
    got = a(x)
    assert a.counters["steps"] == 6
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(a.teacher(x), want)  # the updates of this batch came after its prediction


def test_one_update_equals_a_step_by_hand(tiny_bn_model):
    a = tta.wrap(tiny_bn_model, "rotta", update_frequency=8, seed=3)
    student, teacher = copy.deepcopy(a.model), copy.deepcopy(a.teacher)
    x = torch.rand(8, 3, 8, 8)
    a(x)
    assert a.counters["steps"] == 1
    mem = a.memory.contents()  # the memory as the update saw it (it came after the 8th and last sample)
    set_robust_training(teacher, True)
    views = augment_ct(mem.images, torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = teacher(mem.images)
    logits = student(views)
    t = mem.ages.float() / 64
    w = torch.exp(-t) / (1 + torch.exp(-t))
    loss = (w * -(target.softmax(1) * logits.log_softmax(1)).sum(1)).mean()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for pt, ps in zip(teacher.parameters(), student.parameters()):
            pt.copy_(0.999 * pt + 0.001 * ps)
    assert a.last["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for mine, ref in ((a.model, student), (a.teacher, teacher)):
        for (k, v), (k2, v2) in zip(mine.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(v, v2, msg=k)
    # each network keeps its own robust statistics: the student's saw the augmented images
    assert not torch.allclose(a.model[1].running_mean, a.teacher[1].running_mean)


def test_a_model_without_bn_adapts_its_layer_norm_affine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 10)).eval()
    a = tta.wrap(model, "rotta", update_frequency=4)
    assert a.param_names == ["2.weight", "2.bias"]
    before = a.model[2].weight.detach().clone()
    a(torch.rand(4, 3, 4, 4))
    assert a.counters["steps"] == 1 and not torch.equal(a.model[2].weight, before)
    with pytest.raises(ConfigError, match="no norm-layer affine"):
        tta.wrap(nn.Sequential(nn.Flatten(), nn.Linear(48, 10)), "rotta")


def test_a_batch_of_one_is_accepted(tiny_bn_model):
    a = tta.wrap(tiny_bn_model, "rotta", update_frequency=2)
    outs = [a(torch.rand(1, 3, 8, 8)) for _ in range(3)]
    assert all(o.shape == (1, 10) and torch.isfinite(o).all() for o in outs) and a.counters["steps"] == 1


# --------------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def batches(dev_domains):
    noise, contrast = dev_domains["noise"], dev_domains["contrast"]
    return [noise[:64], noise[64:128], contrast[:64], contrast[64:128]]


def full_state(a):
    return {k: v.clone() for k, v in a.state_dict().items()}


def memory_state(a):
    c = a.memory.contents()
    return [c.images, c.labels, c.uncertainties, c.ages]


@pytest.mark.realdata
def test_rotta_on_resnet20_runs_resets_bit_exactly_and_is_seeded(batches, data_dir):
    a = tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), "rotta", update_frequency=48, seed=1)
    source = full_state(a)
    outs = []
    for x in batches[:3]:  # updates after samples 48, 96, 144 (inside batches 1-3) and 192
        logits = a(x)
        assert logits.shape == (64, 10) and torch.isfinite(logits).all()
        outs.append(logits)
    assert a.counters["steps"] == 4 and a.seen == 192
    moved = full_state(a)
    assert any(not torch.equal(v, source[k]) for k, v in moved.items() if k.startswith("teacher."))
    after = (moved, memory_state(a), a.seen, a.optimizer.state_dict()["state"][0]["exp_avg"].clone())

    a.reset()  # student, teacher (weights and robust statistics), Adam, memory, counter, generator
    assert all(torch.equal(v, source[k]) for k, v in full_state(a).items()) and a.memory is None and a.seen == 0
    for x, want in zip(batches[:3], outs):
        assert torch.equal(a(x), want)
    assert all(torch.equal(v, after[0][k]) for k, v in full_state(a).items())
    assert all(torch.equal(u, v) for u, v in zip(memory_state(a), after[1])) and a.seen == after[2]
    assert torch.equal(a.optimizer.state_dict()["state"][0]["exp_avg"], after[3])

    twin = tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), "rotta", update_frequency=48, seed=1)
    assert all(torch.equal(twin(x), want) for x, want in zip(batches[:2], outs))


@pytest.mark.realdata
def test_rotta_small_and_ragged_batches_and_mid_stream_reset(batches, data_dir):
    x = torch.cat(batches[:2])
    a = tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), "rotta")
    sizes = [16] * 7 + [7, 2]  # a sliding-window-sized batch, a smaller last batch, a pair
    chunks = list(x[:sum(sizes)].split(sizes))
    outs = [a(c) for c in chunks]
    assert [o.shape[0] for o in outs] == sizes and all(torch.isfinite(o).all() for o in outs)
    assert a.counters["steps"] == sum(sizes) // 64
    a.reset()  # as reset_each_shift does mid-stream
    again = [a(c) for c in chunks]
    assert all(torch.equal(u, v) for u, v in zip(outs, again))


@pytest.mark.parametrize("bench", ["cifar10c", "imagenetc"])
def test_configs_write_out_every_default_and_build(bench, tiny_bn_model):
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / bench / "rotta.yaml")
    method = {k: v for k, v in cfg["method"].items() if k != "name"}
    defaults = {k: p.default for k, p in inspect.signature(tta.methods.get("rotta")).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {k: method[k] for k in defaults} == defaults  # the reference's values on both benchmarks
    assert (method["optimizer"], method["lr"], method["steps"]) == ("adam", 0.001, 1)
    a = tta.wrap(tiny_bn_model, "rotta", **method)
    assert a.optimizer.defaults["betas"] == (0.9, 0.999) and a.optimizer.defaults["weight_decay"] == 0.0
