import io
import zipfile

import pytest
import torch
from PIL import Image

from jobs.cli import UserError
from jobs.data import ImageData, load_image_data, make_synthetic, shard_indices
from jobs.models import build_model


@pytest.mark.parametrize("arch,size", [("cifar_resnet18", 32), ("resnet18", 64)])
def test_model_forward_backward(arch, size):
    model = build_model(arch, num_classes=7)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cifar_resnet_has_small_stem():
    m = build_model("cifar_resnet18", 10)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, torch.nn.Identity)


def test_synthetic_is_balanced_and_deterministic():
    a, b = make_synthetic(256, 64, size=16), make_synthetic(256, 64, size=16)
    assert torch.equal(a.train_x, b.train_x) and a.train_x.dtype == torch.uint8
    assert a.train_x.shape == (256, 3, 16, 16)
    assert set(a.train_y.tolist()) == {0, 1, 2, 3}


def test_shards_are_disjoint_equal_and_reshuffled():
    shards = [shard_indices(103, r, 3, epoch=0, seed=1) for r in range(3)]
    assert all(len(s) == 34 for s in shards)
    assert len(set(torch.cat(shards).tolist())) == 102
    assert not torch.equal(shard_indices(103, 0, 3, epoch=1, seed=1), shards[0])


def _write_folder_zip(path, size=8, per_class=3, wrap="set/"):
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.new("RGB", (size, size), colour).save(buf, "PNG")
                    zf.writestr(f"{wrap}{split}/{c}/{i}.png", buf.getvalue())


def test_image_folder_zip_and_cache(tmp_path):
    z = tmp_path / "tiny.zip"
    _write_folder_zip(z)
    d = load_image_data(str(z), tmp_path / "root")
    assert d.classes == ["blue", "red"] and d.train_x.shape == (6, 3, 8, 8)
    assert d.train_x[d.train_y == 1][:, 0].min() == 255  # red images labelled "red"
    assert list((tmp_path / "root" / "cache").glob("*.pt"))
    assert torch.equal(load_image_data(str(z), tmp_path / "root").train_x, d.train_x)  # from the cache
    assert load_image_data(str(z), tmp_path / "root", image_size=4).train_x.shape[-1] == 4


def test_macos_metadata_files_are_not_images(tmp_path):
    z = tmp_path / "tiny.zip"
    _write_folder_zip(z)
    with zipfile.ZipFile(z, "a") as zf:  # what macOS's Finder adds: AppleDouble files that do not decode
        zf.writestr("__MACOSX/set/train/red/._0.png", b"\x00\x05\x16\x07 not an image")
    with zipfile.ZipFile(z) as zf:
        zf.extractall(tmp_path / "tree")
    for source in (z, tmp_path / "tree"):
        assert load_image_data(str(source), tmp_path / "root", image_size=4).train_x.shape == (6, 3, 4, 4)


def test_bad_datasets(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_image_data(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="ImageFolder layout"):
        load_image_data(str(tmp_path / "empty"), tmp_path)
    bad = tmp_path / "bad"
    (bad / "train" / "a").mkdir(parents=True)
    (bad / "test" / "a").mkdir(parents=True)
    (bad / "train" / "a" / "x.jpg").write_bytes(b"not an image")
    (bad / "test" / "a" / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot decode"):
        load_image_data(str(bad), tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="neither"):
        load_image_data(str(tmp_path / "f.txt"), tmp_path)


def test_subset_is_a_fixed_random_draw_not_the_first_class():
    # stored class by class, as an ImageFolder is: the first 40 would all be class 0
    y = torch.arange(4).repeat_interleave(100)
    i = torch.arange(400)
    x = torch.stack([i % 256, i // 256, i * 0], 1).to(torch.uint8).view(400, 3, 1, 1).expand(400, 3, 2, 2).clone()
    data = ImageData(x, y, x[:50], y[:50], ["a", "b", "c", "d"])
    sub = data.subset(40, 10)
    assert len(sub.train_y) == 40 and len(sub.test_y) == 10
    assert len(set(sub.train_y.tolist())) == 4  # every class drawn
    assert torch.equal(sub.train_y, data.subset(40, 10).train_y)  # the same draw every time (every rank)
    order = sub.train_x[:, 0, 0, 0].long() + 256 * sub.train_x[:, 1, 0, 0].long()  # each image's index
    assert torch.equal(order, order.sort().values) and torch.equal(sub.train_y, y[order])  # images keep their labels
    assert data.subset(None, 1000).test_y.numel() == 50  # None or more than there is: everything
