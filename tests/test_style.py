"""Neural style transfer: losses by hand, the optimisation paths, weights, bad input, CLI, Ray batch."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import fastconv
from jobs import style as S
from jobs import vgg as V
from jobs.cli import UserError
from jobs.images import ImageInputError, load_image

TINY = [32, 48]


def make_image(h=40, w=60, seed=0) -> Image.Image:
    """A smooth gradient plus noise: enough structure for non-trivial features."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1)
    img = np.clip(base + 0.2 * rng.standard_normal((h, w, 3)), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def features():
    return V.load_vgg("random", seed=0)


@pytest.fixture(scope="module")
def extractor(features):
    return S.build_extractor(S.StyleConfig(weights="random"), features)


def tiny_cfg(**kw) -> S.StyleConfig:
    base = dict(size=TINY, steps=20, weights="random")
    base.update(kw)
    return S.StyleConfig(**base)


# ----------------------------------------------------------------------------- losses by hand


def test_gram_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)  # C=2, H=1, W=2
    # X X^T = [[5, 11], [11, 25]], divided by C*H*W = 4
    assert torch.allclose(S.gram(x), torch.tensor([[[1.25, 2.75], [2.75, 6.25]]]))


def test_gram_symmetric_and_batched():
    x = torch.randn(3, 4, 5, 6)
    g = S.gram(x)
    assert g.shape == (3, 4, 4)
    assert torch.allclose(g, g.transpose(1, 2))
    assert torch.allclose(g[1], S.gram(x[1:2])[0])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_gram_gradient_in_both_layouts(memory_format):
    """The Gram's one-product backward F (dG + dG^T) / n against finite differences (float64)."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    assert torch.autograd.gradcheck(S.gram, (x,))
    plain = torch.bmm(x.reshape(2, 3, 20), x.reshape(2, 3, 20).transpose(1, 2)) / 60
    assert torch.allclose(S.gram(x), plain)


def test_bf16_gram_is_fp32_and_close():
    x = torch.rand(1, 16, 12, 10)
    g = S.gram(x.bfloat16())
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, S.gram(x), rtol=2e-2, atol=1e-3)
    fp32 = S.gram(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not reach inside: fp32 in, fp32 product
        assert torch.equal(S.gram(x), fp32)


@pytest.mark.parametrize("precision, native_bf16, dtype", [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32),
    ("fp32", True, torch.float32), ("bf16", False, torch.bfloat16)])
def test_vgg_runs_in_the_precision_of_the_setting_and_the_cpu(extractor, monkeypatch, precision, native_bf16, dtype):
    # both kinds of CPU on this one: the probe is replaced, the VGG really runs under the autocast chosen
    monkeypatch.setattr("jobs.precision.native_bf16_cpu", lambda: native_bf16)
    c, s = (S.preprocess(make_image(seed=i), TINY) for i in range(2))
    targets = S.compute_targets(extractor, c, s, tiny_cfg(precision=precision))
    assert targets.content[25].dtype == dtype
    assert all(g.dtype == torch.float32 for g in targets.style_grams.values())  # losses stay fp32


def test_fp16_is_refused_for_gatys():
    with pytest.raises(UserError, match="precision"):
        S.StyleConfig(precision="fp16").validate()


def test_content_loss_by_hand():
    y_hat = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    loss = S.content_loss(y_hat, y)
    assert loss.item() == pytest.approx(5 / 3)  # (0 + 1 + 4) / 3
    loss.backward()
    assert y.grad is None  # the target is a constant


def test_style_loss_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)
    # gram = [[1.25, 2.75], [2.75, 6.25]]; against zeros: (1.5625 + 2 * 7.5625 + 39.0625) / 4
    assert S.style_loss(x, torch.zeros(1, 2, 2)).item() == pytest.approx(13.9375)
    assert S.style_loss(x, S.gram(x)).item() == 0.0


def test_tv_loss_by_hand():
    x = torch.tensor([[0.0, 1.0], [3.0, 5.0]]).reshape(1, 1, 2, 2)
    # vertical |3-0|, |5-1| -> mean 3.5; horizontal |1-0|, |5-3| -> mean 1.5; 0.5 * (3.5 + 1.5)
    assert S.tv_loss(x).item() == pytest.approx(2.5)
    assert S.tv_loss(torch.ones(1, 3, 4, 4)).item() == 0.0


def test_weights_applied_in_one_place(extractor):
    cfg1 = tiny_cfg(content_weight=1, style_weight=1, tv_weight=1)
    cfg2 = tiny_cfg(content_weight=2, style_weight=3, tv_weight=4)
    c, s, x = (S.preprocess(make_image(seed=i), TINY) for i in range(3))
    targets = S.compute_targets(extractor, c, s, cfg1)
    feats = extractor(x, S.run_layers(cfg1))
    l1 = S.weighted_losses(feats, x, targets, cfg1)
    l2 = S.weighted_losses(feats, x, targets, cfg2)
    for k, w in (("content", 2), ("style", 3), ("tv", 4)):
        assert l2[k].item() == pytest.approx(w * l1[k].item(), rel=1e-6)
    assert l2["total"].item() == pytest.approx(sum(l2[k].item() for k in ("content", "style", "tv")), rel=1e-6)


# ----------------------------------------------------------------------------- VGG features


def test_extractor_truncated_frozen_eval(extractor):
    assert len(extractor.layers) == 29  # features[0..28]
    assert not extractor.training
    assert all(not p.requires_grad for p in extractor.parameters())


def test_captured_maps_follow_inplace_relu(extractor):
    """Maps before the last requested layer come out post-ReLU, the last one pre-ReLU (as the reference)."""
    x = S.preprocess(make_image(), TINY)
    with torch.no_grad():
        f = extractor(x, [0, 5, 28])
    assert f[0].min() >= 0 and f[5].min() >= 0
    assert f[28].min() < 0
    with torch.no_grad():
        assert extractor(x, [0])[0].min() < 0  # last requested: pre-ReLU


def test_targets_carry_no_gradient(extractor):
    cfg = tiny_cfg()
    c, s = S.preprocess(make_image(seed=1), TINY), S.preprocess(make_image(seed=2), TINY)
    t = S.compute_targets(extractor, c.requires_grad_(True), s.requires_grad_(True), cfg)
    for v in list(t.content.values()) + list(t.style_grams.values()):
        assert not v.requires_grad and v.grad_fn is None
    assert sorted(t.style_grams) == cfg.style_layers and sorted(t.content) == cfg.content_layers
    assert t.style_grams[28].shape == (1, 512, 512)


def test_vgg_forward_backward_shapes(extractor):
    x = torch.randn(2, 3, *TINY, requires_grad=True)
    f = extractor(x, [0, 5, 10, 19, 25, 28])
    assert f[0].shape == (2, 64, 32, 48) and f[28].shape == (2, 512, 2, 3)
    sum(v.square().mean() for v in f.values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in extractor.parameters())  # no weight gradients


def test_load_vgg_random_is_seeded():
    a, b, c = V.load_vgg("random", 0), V.load_vgg("random", 0), V.load_vgg("random", 1)
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)


def test_load_vgg_from_path_full_and_features_keys(tmp_path, features):
    full = {f"features.{k}": v for k, v in features.state_dict().items()}
    full["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    torch.save(full, tmp_path / "full.pth")
    torch.save(features.state_dict(), tmp_path / "features.pth")
    for name in ("full.pth", "features.pth"):
        loaded = V.load_vgg(str(tmp_path / name))
        assert torch.equal(loaded[34].weight, features[34].weight)
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="do not fit"):
        V.load_vgg(str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="imagenet, random or a state-dict"):
        V.load_vgg(str(tmp_path / "missing.pth"))


def test_load_vgg_imagenet_from_preseeded_hub_cache(tmp_path, monkeypatch, features):
    """`imagenet` goes through VGG19_Weights and the hub cache: a pre-seeded TORCH_HOME works offline."""
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, ckpt / "vgg19-dcbb9e9d.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    loaded = V.load_vgg("imagenet")
    assert torch.equal(loaded[0].weight, features[0].weight)


def test_load_vgg_imagenet_unavailable_is_one_line(tmp_path, monkeypatch):
    import torchvision.models._api as api

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="vgg19-dcbb9e9d.pth"):
        V.load_vgg("imagenet")


# ----------------------------------------------------------------------------- optimisation


@pytest.mark.slow
def test_adam_total_loss_falls(extractor):
    records = []
    img, history = S.stylize(make_image(seed=1), make_image(seed=2), tiny_cfg(), extractor, progress=records.append)
    assert len(history) == 20 and records == history
    assert set(history[0]) >= {"step", "content", "style", "tv", "total", "lr", "size"}
    assert history[-1]["total"] < 0.9 * history[0]["total"]
    assert history[0]["content"] == 0.0  # initialised from the content image
    assert img.size == (TINY[1], TINY[0]) and img.mode == "RGB"


def test_adam_lr_schedule(extractor):
    _, h = S.stylize(make_image(seed=1), make_image(seed=2), tiny_cfg(steps=5, lr_decay_steps=2), extractor)
    assert [r["lr"] for r in h] == pytest.approx([0.3, 0.3, 0.24, 0.24, 0.192])


@pytest.mark.slow
def test_lbfgs_path_runs_and_loss_falls(extractor):
    _, h = S.stylize(make_image(seed=1), make_image(seed=2), tiny_cfg(optimizer="lbfgs", steps=10), extractor)
    assert len(h) == 10 and h[-1]["total"] < h[0]["total"]


@pytest.mark.slow
def test_multiscale_path_seeds_next_scale(extractor):
    cfg = tiny_cfg(steps=4, scales=[0.5, 1.0])
    img, h = S.stylize(make_image(seed=1), make_image(seed=2), cfg, extractor)
    assert [r["size"] for r in h] == [[16, 24]] * 4 + [[32, 48]] * 4
    assert [r["scale"] for r in h] == [0] * 4 + [1] * 4
    assert h[4]["content"] > 0  # the second scale starts from the upsampled result, not the content
    assert img.size == (48, 32)


def test_noise_init_and_reuse_is_deterministic(extractor):
    cfg = tiny_cfg(steps=3, init="noise")
    a, ha = S.stylize(make_image(seed=1), make_image(seed=2), cfg, extractor)
    b, hb = S.stylize(make_image(seed=1), make_image(seed=2), cfg, extractor)
    assert ha[0]["content"] > 0
    assert [r["total"] for r in ha] == [r["total"] for r in hb]
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_bf16_precision_runs(extractor):
    _, h = S.stylize(make_image(seed=1), make_image(seed=2), tiny_cfg(steps=3, precision="bf16"), extractor)
    assert all(np.isfinite(r["total"]) for r in h)


@pytest.mark.slow
def test_distances_unweighted(extractor):
    content, style = make_image(seed=1), make_image(seed=2)
    d = S.distances(content, content, style, extractor, size=TINY)
    assert d["content"] == 0.0 and d["style"] > 0 and d["tv"] > 0
    assert S.distances(style, content, style, extractor, size=TINY)["style"] == 0.0
    # random VGG maps are small: a large style weight makes the style term lead
    img, _ = S.stylize(content, style, tiny_cfg(optimizer="lbfgs", steps=10, style_weight=1e9, tv_weight=0),
                       extractor)
    d_img = S.distances(img, content, style, extractor, size=TINY)
    assert d_img["content"] > 0 and d_img["style"] < d["style"]


# ----------------------------------------------------------------------------- bad input


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_with_size(w: int, h: int) -> bytes:
    """A valid small PNG whose header claims w x h (a decompression-bomb shape)."""
    data = bytearray(png_bytes(Image.new("L", (4, 4))))
    ihdr = data[12:16 + 13]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", w, h)
    data[12:16 + 13] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_bad_images_are_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    good = png_bytes(make_image())
    (tmp_path / "trunc.png").write_bytes(png_bytes(make_image(200, 200))[:300])
    cases = [
        (str(tmp_path / "missing.jpg"), "not found"),
        (str(tmp_path / "notes.txt"), "not a readable image"),
        (b"", "not a readable image"),
        (str(tmp_path / "trunc.png"), "cannot be decoded"),
        (Image.new("RGB", (0, 5)), "zero size"),
        (png_with_size(100_000, 100_000), "over the limit|too many pixels"),
    ]
    for source, msg in cases:
        with pytest.raises(ImageInputError, match=msg):
            load_image(source)
    assert issubclass(ImageInputError, UserError)
    with pytest.raises(ImageInputError, match="over the limit"):
        load_image(good, max_pixels=100)
    assert load_image(good).size == (60, 40)


def test_bad_config_is_clear_error():
    for kw, msg in [(dict(style_layers=[0, 40]), "unknown style layer index 40"),
                    (dict(content_layers=[-1]), "unknown content layer"),
                    (dict(style_layers=[]), "must not be empty"),
                    (dict(size=[0, 10]), "size"),
                    (dict(size=[10000, 10000]), "pixel limit"),
                    (dict(scales=[0.0]), "scales"),
                    (dict(optimizer="sgd"), "optimizer"),
                    (dict(style_weight=float("nan")), "style_weight")]:
        with pytest.raises(UserError, match=msg):
            S.StyleConfig(**kw).validate()


# ----------------------------------------------------------------------------- CLI


def test_cli_single_writes_image_curves_json(tmp_path, capsys):
    from jobs.style_cli import main

    make_image(seed=1).save(tmp_path / "c.png")
    make_image(seed=2).save(tmp_path / "s.jpg")
    out = tmp_path / "out" / "r.png"
    main(["--content", str(tmp_path / "c.png"), "--style", str(tmp_path / "s.jpg"), "--out", str(out),
          "--weights", "random", "--size", "32", "48", "--steps", "3", "--style-weight", "1e4"])
    assert "RANDOM weights" in capsys.readouterr().out
    assert Image.open(out).size == (48, 32)
    assert (tmp_path / "out" / "r-losses.png").stat().st_size > 0
    result = json.loads((tmp_path / "out" / "r.json").read_text())
    assert result["config"]["style_weight"] == 1e4 and result["config"]["content_layers"] == [25]
    assert len(result["history"]) == 3 and "warning" in result
    assert result["convolutions"] == "default"  # 32x48: too small for Winograd convolutions to pay


def test_winograd_from_a_working_size_and_in_fp32_only(tmp_path, capsys):
    """jobs.style on a 96x96 image: Winograd convolutions where the VGG runs fp32 on this CPU; the smallest
    scale decides; --no-winograd and bf16 keep PyTorch's kernels."""
    assert S.winograd_wanted(tiny_cfg(size=[96, 96])) and not S.winograd_wanted(tiny_cfg(size=[95, 96]))
    assert not S.winograd_wanted(tiny_cfg(size=[192, 192], scales=[0.25, 1.0]))
    assert not S.winograd_wanted(tiny_cfg(size=[96, 96], winograd=False))
    from jobs.style_cli import main

    make_image(96, 96, seed=1).save(tmp_path / "c.png")
    make_image(96, 96, seed=2).save(tmp_path / "s.png")
    main(["--content", str(tmp_path / "c.png"), "--style", str(tmp_path / "s.png"), "--out", str(tmp_path / "r.png"),
          "--weights", "random", "--size", "96", "96", "--steps", "2", "--precision", "fp32"])
    fp32 = "winograd" if fastconv.available() else "default"
    assert f"precision fp32; convolutions {fp32}" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["convolutions"] == fp32


@pytest.mark.slow
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys):
    from jobs.cli import run_cli
    from jobs.style_cli import main

    make_image().save(tmp_path / "c.png")
    common = ["--content", str(tmp_path / "c.png"), "--out", str(tmp_path / "o.png"), "--weights", "random",
              "--size", "16", "16"]
    # from the shell once (python -m jobs.style wires main into run_cli) ...
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-m", "jobs.style", *common, "--style", str(tmp_path / "nope.jpg")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "Traceback" not in p.stderr
    # ... then in this process, through the same run_cli
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [*common, "--style", str(tmp_path / "c.png"), "--style-layers", "0", "99"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, err


def test_cli_needs_one_output_mode(tmp_path):
    from jobs.style_cli import main

    with pytest.raises(UserError, match="exactly one of --out"):
        main(["--content", "a.jpg", "--style", "b.jpg"])
    with pytest.raises(UserError, match="one --content and one --style"):
        main(["--content", "a.jpg", "b.jpg", "--style", "c.jpg", "--out", str(tmp_path / "o.png")])


# ----------------------------------------------------------------------------- batch on Ray


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_batch_on_ray_two_workers(tmp_path, local_ray):
    from jobs.style_cli import run_batch

    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}.png"
        make_image(seed=i).save(p)
        paths.append(str(p))
    cfg = tiny_cfg(steps=3, size=[24, 32]).validate()
    out = tmp_path / "batch"
    result = run_batch(cfg, paths[:2], paths[2:], str(out))
    assert len(result["pairs"]) == 4
    for pair in result["pairs"]:
        assert Image.open(out / pair["output"]).size == (32, 24)
        assert len(pair["history"]) == 3
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (3 * 160, 3 * 160)
    assert json.loads((out / "result.json").read_text())["config"]["device"] == "cpu"
    with pytest.raises(UserError, match="no GPU"):
        run_batch(cfg, paths[:1], paths[2:3], str(out), use_gpu=True)
