"""The fast CIFAR-10 recipe and time budgets: the network, whitening, the recipe's pieces, and
budgeted runs end to end on Ray Train (2 workers, gloo)."""
import dataclasses
import json
import time

import pytest
import ray
import torch
import torch.nn.functional as F

from jobs import driver
from jobs.augment import Config, build_setup
from jobs.cli import UserError
from jobs.transforms import alternating_flip, flip_bits, random_translate
from jobs.airbench import TTA, Lookahead, Muon, flip_tta, muon_param_groups, orthogonalize, sgd_param_groups, warmup_decay
from jobs.models import FastCifarNet, build_model, fast_cifar_net_small, init_whitening_

FAST_TINY = dict(recipe="fast", data="synthetic:1024", image_size=16, batch_size=128, num_workers=2)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    yield
    ray.shutdown()


@pytest.mark.parametrize("arch", ["fast_cifar_net", "fast_cifar_net_wide", "fast_cifar_net_small"])
def test_fast_net_forward_backward(arch):
    model = build_model(arch, num_classes=10)
    x = torch.randn(8, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (8, 10)
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # BN scales are frozen: only the shifts learn
    assert not model.blocks[0].norm1.weight.requires_grad and model.blocks[0].norm1.bias.requires_grad
    # smaller images work too (global max-pool), as on the synthetic data
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_whitening_init_whitens_patches():
    # correlated pixels: smooth random images, channels mixed, so the raw patch covariance is far from I
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.randn(32, 3, 18, 18, generator=g), 3, stride=1)  # (32, 3, 16, 16)
    x = torch.einsum("ij,bjhw->bihw", torch.tensor([[1.0, 0.5, 0.2], [0.3, 1.0, 0.1], [0.6, 0.4, 1.0]]), x)
    conv = torch.nn.Conv2d(3, 24, 2, bias=True)
    init_whitening_(conv, x, eps=1e-6)
    with torch.no_grad():
        y = conv(x)  # (32, 24, 15, 15)
    feats = y[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    cov = feats.T @ feats / len(feats)
    torch.testing.assert_close(cov, torch.eye(12), atol=1e-3, rtol=0)
    torch.testing.assert_close(y[:, 12:], -y[:, :12])  # the negated filters, for the GELU that follows
    with pytest.raises(ValueError, match="24 output channels"):
        init_whitening_(torch.nn.Conv2d(3, 16, 2), x)


def test_translate_and_alternating_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    out = random_translate(x, g, pad=2)
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(16):  # each image is one 8x8 window of its reflect-padded self
        windows = padded[i].unfold(1, 8, 1).unfold(2, 8, 1)  # (3, 5, 5, 8, 8)
        assert any(torch.equal(windows[:, r, c], out[i]) for r in range(5) for c in range(5))
    assert torch.equal(random_translate(x, g, pad=0), x)
    bits = flip_bits(16, seed=0)
    even, odd = alternating_flip(x, bits, 0), alternating_flip(x, bits, 1)
    assert torch.equal(even, torch.where(bits.view(-1, 1, 1, 1), x.flip(-1), x))
    assert torch.equal(odd.flip(-1), even)  # every image is seen the other way round next epoch
    assert torch.equal(alternating_flip(x, bits, 2), even)


def test_schedule_param_groups_lookahead_tta():
    assert warmup_decay(0.0) == pytest.approx(0.2)
    assert warmup_decay(0.23) == pytest.approx(1.0)
    assert warmup_decay(1.0) == pytest.approx(0.07)
    assert warmup_decay(0.1) < warmup_decay(0.2) and warmup_decay(0.5) > warmup_decay(0.9)

    model = FastCifarNet(10, widths=(8, 8, 8))
    groups = sgd_param_groups(model, lr=0.1, weight_decay=1e-3, bn_lr_scale=64)
    assert groups[1]["lr"] == pytest.approx(6.4) and groups[1]["lr"] * groups[1]["weight_decay"] == pytest.approx(1e-4)
    assert sum(len(gr["params"]) for gr in groups) == sum(p.requires_grad for p in model.parameters())

    # lookahead: slow weights trail; two ranks with the same weights stay identical; finish loads slow
    a, b = FastCifarNet(10, widths=(8, 8, 8)), FastCifarNet(10, widths=(8, 8, 8))
    b.load_state_dict(a.state_dict())
    la, lb = Lookahead(every=1), Lookahead(every=1)
    start = a.head.weight.detach().clone()
    for step in range(3):
        for model, avg in ((a, la), (b, lb)):
            with torch.no_grad():
                model.head.weight.add_(1.0)
            avg.update(model, step, progress=1.0)
    assert torch.equal(a.head.weight, b.head.weight)
    assert (a.head.weight - start).max() < 3.0  # pulled back towards the slow weights
    la.finish(a)
    torch.testing.assert_close(a.head.weight, la.slow["head.weight"])

    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(flip_tta(a.eval(), x), 0.5 * (a(x) + a(x.flip(-1))))


def test_flip_translate_tta_averages_six_views_and_keeps_the_layout():
    """Half the flip TTA of the image, a quarter each of the flip TTA of the image moved one pixel
    up-left and down-right (reflected edges); channels_last inputs give channels_last views."""
    torch.manual_seed(0)
    model = fast_cifar_net_small(10).eval().to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 32, 32)
    # moved up-left: pixel (i, j) of the view is pixel (i - 1, j - 1) of x, reflected at the edge
    rows = [1] + list(range(0, 31))
    up_left = x[:, :, rows][:, :, :, rows]
    down_right = x[:, :, list(range(1, 32)) + [30]][:, :, :, list(range(1, 32)) + [30]]
    seen = []

    def spy(m, inp):
        seen.append(inp[0].is_contiguous(memory_format=torch.channels_last))

    model.register_forward_pre_hook(spy)
    with torch.no_grad():
        got = TTA["flip-translate"](model, x.contiguous(memory_format=torch.channels_last))
        seen_views = list(seen)
        want = 0.5 * flip_tta(model, x) + 0.25 * (flip_tta(model, up_left) + flip_tta(model, down_right))
        torch.testing.assert_close(TTA["none"](model, x), model(x))
    torch.testing.assert_close(got, want)
    assert len(seen_views) == 6 and all(seen_views)


def test_orthogonalize_moves_every_singular_value_near_one():
    """Wide and tall matrices: singular values spread over a decade (the smallest ~1/40 of the
    Frobenius norm) in, all within 0.6-1.25 out, with the input's singular vectors."""
    torch.manual_seed(0)
    for m, n in [(64, 576), (576, 64), (32, 216)]:
        u, _ = torch.linalg.qr(torch.randn(max(m, n), min(m, n)))
        v, _ = torch.linalg.qr(torch.randn(min(m, n), min(m, n)))
        g = u @ torch.diag(torch.logspace(-1, 0, min(m, n))) @ v.T
        g = g if m >= n else g.T
        out = orthogonalize(g)
        assert out.shape == (m, n)
        s = torch.linalg.svdvals(out)
        assert 0.6 < s.min() and s.max() < 1.25, (m, n, s.min(), s.max())
        # the same singular vectors: out ~ U Vᵀ, so out aligns with U Vᵀ far better than g does
        uv = (u @ v.T) if m >= n else (u @ v.T).T
        assert F.cosine_similarity(out.flatten(), uv.flatten(), dim=0) > 0.95


def test_muon_steps_filters_at_fixed_norm_and_the_rest_as_torch_sgd():
    torch.manual_seed(0)
    a = FastCifarNet(10, widths=(8, 16, 16))
    a.whiten.weight.requires_grad_(False)
    b = FastCifarNet(10, widths=(8, 16, 16))
    b.load_state_dict(a.state_dict())
    b.whiten.weight.requires_grad_(False)
    groups = muon_param_groups(a, lr=0.1, muon_lr=0.2, weight_decay=1e-3, bn_lr_scale=64)
    filters = [m.weight for m in a.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    assert [g.get("muon", False) for g in groups] == [False, False, True] and groups[-1]["params"] == filters
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in a.parameters())
    muon = Muon(groups, lr=0.1, momentum=0.85)
    sgd = torch.optim.SGD(sgd_param_groups(b, 0.1, 1e-3, 64), momentum=0.85, nesterov=True)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))

    def step(model, opt):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step(a, muon), step(b, sgd)  # from the same weights: the same gradients
    # the SGD-stepped parameters move as torch's SGD (Nesterov, coupled weight decay) moves them
    torch.testing.assert_close(a.head.weight, b.head.weight)
    torch.testing.assert_close(a.blocks[0].norm1.bias, b.blocks[0].norm1.bias)
    step(a, muon), step(a, muon)
    for w, w0 in zip(filters, [m.weight for m in b.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]):
        assert not torch.allclose(w, w0)  # Muon moved them differently
        # renormalised to sqrt(out) before each step, then moved by lr * (a near-orthogonal update)
        assert abs(w.norm() - w.size(0) ** 0.5) < 0.2 * w.size(0) ** 0.5
    b.whiten.weight.requires_grad_(True)  # --no-whiten: trained, and on SGD (no BatchNorm after it)
    assert any(p is b.whiten.weight for p in muon_param_groups(b, 0.1, 0.2, 1e-3, 64)[0]["params"])
    # a checkpoint round trip continues identically
    state = muon.state_dict()
    again = Muon(muon_param_groups(a, 0.1, 0.2, 1e-3, 64), lr=0.1, momentum=0.85)
    again.load_state_dict(state)
    assert again.param_groups[-1]["muon"] and again.param_groups[-1]["muon_momentum"] == 0.6
    assert torch.equal(again.state[filters[0]]["momentum_buffer"], muon.state[filters[0]]["momentum_buffer"])


def test_fast_recipe_picks_its_network_from_where_it_trains(monkeypatch):
    """fp32 on a CPU: the half-width net (more epochs per budget) with Muon and a frozen whitening bias;
    bf16 or a GPU: fast_cifar_net with SGD, the bias trained. What the user gives is kept, and the reason
    names what was chosen."""
    import jobs.precision
    small, full = ("fast_cifar_net_small", 512, "muon", False), ("fast_cifar_net", 1024, "sgd", True)
    for native, precision, gpu, chosen in [(False, "fast", False, small), (False, "auto", False, small),
                                           (True, "fast", False, full), (True, "fp32", False, small),
                                           (False, "bf16", False, full), (False, "fast", True, full)]:
        monkeypatch.setattr(jobs.precision, "native_bf16_cpu", lambda: native)
        cfg = Config(recipe="fast", precision=precision, use_gpu=gpu)
        assert (cfg.arch, cfg.batch_size, cfg.optimizer, cfg.whiten_bias) == chosen, (native, precision, gpu)
        assert cfg.arch_reason.startswith("arch, batch size, optimizer and whiten bias: ")  # printed by validate
        assert cfg.lr == pytest.approx(1.5 * chosen[1] / 1024)  # the lr follows the chosen batch
    monkeypatch.setattr(jobs.precision, "native_bf16_cpu", lambda: False)
    cfg = Config(recipe="fast", arch="fast_cifar_net_wide")  # the user's network, the recipe's batch
    assert (cfg.arch, cfg.batch_size) == ("fast_cifar_net_wide", 512)
    assert cfg.arch_reason.startswith("batch size, optimizer and whiten bias: ")
    assert Config(recipe="fast", arch="fast_cifar_net", batch_size=256,
                  whiten_bias=True).arch_reason.startswith("optimizer: ")
    assert Config(recipe="fast", arch="fast_cifar_net", batch_size=256, optimizer="sgd",
                  whiten_bias=True).arch_reason == ""
    assert Config().arch == "cifar_resnet18" and Config().arch_reason == "" and Config().optimizer == "adam"


def test_fast_recipe_config_defaults_and_overrides():
    cfg = Config(recipe="fast", precision="bf16")  # bf16: fast_cifar_net at batch 1024 on any machine
    assert (cfg.arch, cfg.batch_size, cfg.optimizer, cfg.lookahead, cfg.tta) == ("fast_cifar_net", 1024, "sgd", True,
                                                                                "flip")
    assert cfg.lr == pytest.approx(1.5)
    assert Config(recipe="fast", batch_size=512).lr == pytest.approx(0.75)  # scaled with the batch
    assert Config(recipe="fast", lookahead=False, aug="translate").aug == "translate"
    ref = Config()
    assert (ref.arch, ref.batch_size, ref.optimizer, ref.lr, ref.aug) == ("cifar_resnet18", 256, "adam", 1e-3, "flip")
    setup = build_setup(Config(**{**FAST_TINY, "num_workers": 1}), torch.device("cpu"), 0, 1)
    assert isinstance(setup.averager, Lookahead)
    assert setup.schedule(0.0) == pytest.approx(0.2) and setup.schedule(1.0) == pytest.approx(0.07)  # warm-up, decay
    # evaluation sees flip TTA: the task's loss is the smoothed cross-entropy of the mean logits
    images, labels = next(iter(setup.test_batches()))
    x = setup.prepare(images, False, None)
    with torch.no_grad():
        loss, sums = setup.task.evaluate(setup.model.eval(), x, labels)
        logits = flip_tta(setup.model, x)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=0.2))
    assert sums["acc"] == (logits.argmax(1) == labels).sum()
    # the run's last evaluation (the reported accuracy) averages the six flip-translate views
    with torch.no_grad():
        loss, sums = setup.task.evaluate(setup.model, x, labels, final=True)
        logits = TTA["flip-translate"](setup.model, x)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=0.2))
    assert (Config().tta, Config().final_tta) == ("none", "none")
    muon = build_setup(Config(**{**FAST_TINY, "num_workers": 1}, optimizer="muon", muon_lr=0.1), torch.device("cpu"), 0, 1)
    assert isinstance(muon.optimizer, Muon) and muon.optimizer.param_groups[-1]["muon"]
    assert muon.optimizer.param_groups[-1]["lr"] == 0.1 and muon.optimizer.param_groups[0]["lr"] == pytest.approx(0.1875)
    assert not setup.model.whiten.weight.requires_grad
    # a frozen whitening bias (the fast recipe in fp32 on a CPU): in no optimizer group, still 0 after a step,
    # and the first conv's input needs no gradient (the backward skips it: the step's saving)
    frozen = build_setup(Config(**{**FAST_TINY, "num_workers": 1}, optimizer="muon", whiten_bias=False),
                         torch.device("cpu"), 0, 1)
    whiten = frozen.model.whiten
    assert not whiten.bias.requires_grad
    trained = build_setup(Config(**{**FAST_TINY, "num_workers": 1}, whiten_bias=True), torch.device("cpu"), 0, 1)
    assert trained.model.whiten.bias.requires_grad
    assert any(p is trained.model.whiten.bias for g in trained.optimizer.param_groups for p in g["params"])
    assert all(p is not whiten.bias for g in frozen.optimizer.param_groups for p in g["params"])
    x, y = next(iter(frozen.train_batches(0)))
    x = frozen.prepare(x, True, torch.Generator().manual_seed(0))
    assert not whiten(x).requires_grad
    frozen.task.loss(frozen.model, x, y)[0].backward()
    frozen.optimizer.step()
    assert whiten.bias.grad is None and not whiten.bias.any()
    x, y = next(iter(setup.train_batches(0)))
    prepared = setup.prepare(x, True, torch.Generator().manual_seed(0))
    assert prepared.shape == (128, 3, 16, 16) and abs(float(prepared.mean())) < 0.5  # standardised


@pytest.mark.slow
def test_time_budget_stops_on_time_and_learns(local_ray, tmp_path, capsys):
    budget = 15.0
    # 32 steps an epoch, so that the budget holds a few epochs, not dozens of reports and checkpoints
    cfg = Config(**{**FAST_TINY, "data": "synthetic:4096"}, time_budget=budget, eval_every=0,
                 storage_path=str(tmp_path), name="budget")
    t0 = time.perf_counter()
    summary = driver.fit("jobs.augment", cfg)
    wall = time.perf_counter() - t0
    result = json.loads((tmp_path / "budget" / "result.json").read_text())
    assert result["test_acc"] == summary["test_acc"] and result["plan"]["fixed"]
    checkpoints = sorted(p.name for p in (tmp_path / "budget").glob("checkpoint_*") if p.is_dir())
    # training stopped within a few seconds of the budget, and no later than it allows
    assert budget - 5 <= result["train_time_s"] <= budget + 3, result["train_time_s"]
    assert wall < budget + 300  # plus Ray start-up, data and one evaluation: generous for a loaded machine
    # it ran the planned steps, or the deadline check stopped it once the slowest rank passed the budget
    assert result["steps"] == result["plan"]["total_steps"] or (result["plan"]["expired"]
                                                                and result["train_time_s"] >= budget)
    # intermediate epochs were not evaluated (--eval-every 0), the last one was
    assert all(h["test_acc"] is None for h in result["history"][:-1])
    # 4 balanced classes: chance is 0.25
    assert summary["test_acc"] > 0.6, summary["history"]
    # re-running the finished budgeted run returns its result without starting Ray Train again
    capsys.readouterr()
    again = driver.fit("jobs.augment", cfg)
    assert again["history"] == summary["history"] and again["checkpoint"] == summary["checkpoint"]
    assert "budget: finished earlier with this config" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "budget").glob("checkpoint_*") if p.is_dir()) == checkpoints  # nothing new
    # a changed setting is not the finished run: it goes through Ray Train (and resumes there)
    assert driver.finished_run(dataclasses.replace(cfg, seed=cfg.seed + 1)) is None


@pytest.mark.slow  # trains 16 steps (~12 s)
def test_progressive_resizing_trains_the_first_part_at_low_resolution(tmp_path, monkeypatch):
    """--low-res-size 16 --low-res-until 0.5: the first half of the planned steps see 16 px batches,
    the rest (and evaluation) the images' own 32 px; a size the images cannot be shrunk to is one line.
    Epoch 1 is evaluated with --tta (flip), the last epoch with --final-tta (flip-translate)."""
    from jobs import airbench, augment, loop
    from test_train import FakeSession

    sizes, evaluated = [], []
    resize = loop.resize_square
    monkeypatch.setattr(loop, "resize_square", lambda x, size: sizes.append(size) or resize(x, size))
    for name in ("flip", "flip-translate"):
        tta = airbench.TTA[name]
        monkeypatch.setitem(airbench.TTA, name, lambda model, x, name=name, tta=tta: evaluated.append(name) or tta(model, x))
    cfg = Config(**{**FAST_TINY, "image_size": 32, "num_workers": 1}, epochs=2, low_res_size=16, low_res_until=0.5,
                 storage_path=str(tmp_path), name="lowres")
    threads = torch.get_num_threads()
    try:
        history = loop.train(cfg, augment, FakeSession(tmp_path), rank=0, world=1, device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert sizes == [16] * 8 + [None] * 8  # 1024 images / 128 per step, 2 epochs: progress 0..7/16 at 16 px
    assert evaluated == ["flip"] * 2 + ["flip-translate"] * 2  # 256 test images, 2 batches per evaluation
    assert history[-1]["test_acc"] is not None
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    small = loop.resize_square(x, 16)
    assert small.shape == (2, 3, 16, 16) and small.is_contiguous(memory_format=torch.channels_last)
    assert loop.resize_square(x, None) is x and loop.resize_square(x, 32) is x
    from jobs.augment import validate
    with pytest.raises(UserError, match="--low-res-size 32 must be at least 16 and below the training images' side"):
        validate(Config(**{**FAST_TINY, "image_size": 32}, low_res_size=32, data_root=str(tmp_path)))
