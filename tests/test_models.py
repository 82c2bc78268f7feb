"""Model zoo: torchvision weight compatibility, numeric parity, sizes, small-input stems, pretrained loading."""
import os

import pytest
import torch
import torchvision
from PIL import Image

from models import available_models, build_model, count_macs, count_params, load_pretrained
from models.mobilenetv2 import _make_divisible
from models.pretrained import resolve_imagenet_weights
from utils.errors import UserError

PHOTOS = os.path.join(os.path.dirname(__file__), "assets", "photos")
TV = {
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
}
PARITY_CASES = [("mobilenet_v2", 1.0), ("mobilenet_v2", 0.5), ("mobilenet_v3_large", 1.0), ("mobilenet_v3_small", 1.0)]


@pytest.mark.parametrize("name,width", PARITY_CASES)
def test_state_dict_matches_torchvision_and_logits_agree(name, width):
    torch.manual_seed(0)
    tv = TV[name](width_mult=width).eval()
    # Non-trivial BN statistics so that the check covers running_mean/var too.
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = build_model(name, num_classes=1000, width_mult=width).eval()
    tv_sd, our_sd = tv.state_dict(), ours.state_dict()
    assert list(our_sd) == list(tv_sd)
    assert {k: tuple(v.shape) for k, v in our_sd.items()} == {k: tuple(v.shape) for k, v in tv_sd.items()}
    ours.load_state_dict(tv_sd, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x) - tv(x)).abs().max().item()
    assert diff <= 1e-5


def test_mobilenet_v2_size_and_macs():
    m = build_model("mobilenet_v2", num_classes=1000)
    assert count_params(m) == 3_504_872
    macs = count_macs(m, 224)
    assert abs(macs - 300e6) <= 0.01 * 300e6, macs


def test_mobilenet_v1_matches_paper_size():
    m = build_model("mobilenet_v1", num_classes=1000)
    assert round(count_params(m) / 1e6, 1) == 4.2  # paper: 4.2M parameters, 569M mult-adds
    assert abs(count_macs(m, 224) - 569e6) <= 0.01 * 569e6


def test_make_divisible_rounds_like_reference():
    assert _make_divisible(32 * 0.5, 8) == 16
    assert _make_divisible(1280 * 1.4, 8) == 1792
    assert _make_divisible(16 * 0.35, 8) == 8
    assert _make_divisible(24 * 0.75, 8) == 24  # 18 rounds to 16, which is < 90% of 18 -> 24


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_small_input_keeps_resolution_and_weight_shapes(name):
    normal = build_model(name, num_classes=10, width_mult=0.25)
    small = build_model(name, num_classes=10, width_mult=0.25, small_input=True).eval()
    assert {k: v.shape for k, v in normal.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap_small = small.features(x)
        fmap_normal = normal.eval().features(x)
        assert small(x).shape == (2, 10)
    assert fmap_small.shape[-1] == 4  # total stride 8 instead of 32
    assert fmap_normal.shape[-1] == 1


def test_factory_names_and_errors():
    assert available_models() == ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]
    m = build_model("mobilenet_v2", num_classes=5, width_mult=0.5)
    assert m.classifier[-1].out_features == 5 and m.arch["width_mult"] == 0.5
    with pytest.raises(UserError, match="unknown model 'mobilenet_v9'; choose one of: mobilenet_v1"):
        build_model("mobilenet_v9")


@pytest.fixture(scope="module")
def imagenet_file():
    return resolve_imagenet_weights("mobilenet_v2")


def test_real_imagenet_weights_match_torchvision_on_real_photos(imagenet_file):
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(torch.load(imagenet_file, map_location="cpu", weights_only=True), strict=True)
    tv.eval()
    ours = build_model("mobilenet_v2")
    report = load_pretrained(ours, "imagenet")
    assert report.skipped == [] and len(report.loaded) == 314
    ours.eval()
    tf = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    names = sorted(f for f in os.listdir(PHOTOS) if f.endswith(".jpg"))
    x = torch.stack([tf(Image.open(os.path.join(PHOTOS, f)).convert("RGB")) for f in names])
    with torch.no_grad():
        a, b = ours(x), tv(x)
    assert (a - b).abs().max().item() <= 1e-5
    # The photos are named after what the real ImageNet model sees in them.
    cats = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    predicted = [cats[i].replace(" ", "_") for i in a.argmax(1).tolist()]
    assert predicted == [f[:-4] for f in names]


def test_pretrained_into_5_classes_skips_only_the_classifier(imagenet_file):
    model = build_model("mobilenet_v2", num_classes=5)
    fresh_head = model.classifier[1].weight.clone()
    report = load_pretrained(model, imagenet_file)
    assert report.skipped == ["classifier.1.bias", "classifier.1.weight"]
    state = torch.load(imagenet_file, map_location="cpu", weights_only=True)
    own = model.state_dict()
    for k, v in state.items():
        if not k.startswith("classifier.1."):
            assert torch.equal(own[k], v), k
    assert torch.equal(model.classifier[1].weight, fresh_head)
    assert "re-initialised (class count differs): classifier.1.bias, classifier.1.weight" in str(report)


def test_pretrained_errors_are_clear(tmp_path, imagenet_file):
    v3 = build_model("mobilenet_v3_small", num_classes=5)
    with pytest.raises(UserError, match=r"does not fit mobilenet_v3_small width 1.0: missing .*unexpected"):
        load_pretrained(v3, imagenet_file)
    half = build_model("mobilenet_v2", num_classes=1000, width_mult=0.5)
    with pytest.raises(UserError, match=r"different shapes features.0.0.weight \(32, 3, 3, 3\) vs \(16, 3, 3, 3\)"):
        load_pretrained(half, imagenet_file)
    # a train.py checkpoint records its architecture: the error names it and the flags that fit it
    small = build_model("mobilenet_v3_small", num_classes=5, width_mult=0.25)
    ckpt = str(tmp_path / "best.pt")
    torch.save({"model": small.state_dict(), "arch": dict(small.arch)}, ckpt)
    with pytest.raises(UserError, match=r"does not fit mobilenet_v2 width 0.5 \(it was saved from mobilenet_v3_small "
                                        r"width 0.25: train with --model mobilenet_v3_small --width-mult 0.25\)"):
        load_pretrained(half, ckpt)
    # a pruned checkpoint of the same name and width: the hint says why, not "use the same flags"
    torch.save({"model": {k: v[:1] if v.ndim else v for k, v in half.state_dict().items()}, "arch": dict(half.arch),
                "pruned": {"ratio": 0.3}}, ckpt)
    with pytest.raises(UserError, match=r"it is a pruned checkpoint: its layers are narrower"):
        load_pretrained(half, ckpt)
    with pytest.raises(UserError, match="weights file .*nope.pth not found"):
        load_pretrained(half, str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read weights file .*junk.pth \(not a PyTorch file \(an ONNX model, "
                                        r"an image or another format\?\)\)"):
        load_pretrained(half, str(junk))
    with pytest.raises(UserError, match="no ImageNet weights exist for mobilenet_v1"):
        load_pretrained(build_model("mobilenet_v1"), "imagenet")


def test_weights_only_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(UserError, match="cannot read weights file") as e:
        load_pretrained(build_model("mobilenet_v2", width_mult=0.25), str(path))
    # torch's own text advises weights_only=False, which would run the file's code: never passed on
    assert "pickled Python objects" in str(e.value) and "weights_only=False" not in str(e.value).replace(" ", "")
    assert "set to `False`" not in str(e.value)
    from utils.checkpoint import load_checkpoint
    with pytest.raises(UserError) as e:
        load_checkpoint(str(path))
    assert str(e.value).startswith(f"cannot read checkpoint {path} (it holds pickled Python objects (a whole model "
                                   "saved with torch.save(model)?), which are never loaded")
    photo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "photos", "ibex.jpg")
    with pytest.raises(UserError) as e:
        load_checkpoint(photo)
    assert str(e.value) == (f"cannot read checkpoint {photo} (not a PyTorch file (an ONNX model, an image or another "
                            "format?)); it must be a .pt file written by train.py")
    # a checkpoint cut short (an interrupted copy): torch's miniz text is replaced by what happened and the fix
    whole = tmp_path / "whole.pt"
    torch.save({"model": build_model("mobilenet_v2", width_mult=0.25).state_dict()}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(UserError) as e:
        load_checkpoint(str(cut))
    assert str(e.value) == (f"cannot read checkpoint {cut} (incomplete or damaged: the file ends before its index; "
                            "copy it again, or take last.pt / best.pt); it must be a .pt file written by train.py")


def test_offline_download_failure_names_the_fix(tmp_path, monkeypatch):
    import models.pretrained as P

    monkeypatch.setattr(P, "_torch_hub_dir", lambda: tmp_path)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(UserError, match=r"ImageNet weights for mobilenet_v3_large are not on this machine .*OSError: no network.*copy mobilenet_v3_large-8738ca79.pth into"):
        P.resolve_imagenet_weights("mobilenet_v3_large")


def test_download_creates_the_cache_folder(tmp_path, monkeypatch):
    import models.pretrained as P

    hub = tmp_path / "fresh" / "hub" / "checkpoints"
    monkeypatch.setattr(P, "_torch_hub_dir", lambda: hub)
    seen = {}

    def fake_download(url, dst, progress=True):
        seen["parent_exists"] = os.path.isdir(os.path.dirname(dst))
        torch.save({}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert P.resolve_imagenet_weights("mobilenet_v3_small") == str(hub / "mobilenet_v3_small-047dcff4.pth")
    assert seen["parent_exists"]


def test_out_of_memory_becomes_one_clear_line(capsys):
    from utils.errors import run_main

    def main():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried")

    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (") and "lower --batch-size or --img-size" in err
    with pytest.raises(RuntimeError, match="other bug"):
        run_main(lambda: (_ for _ in ()).throw(RuntimeError("other bug")))
