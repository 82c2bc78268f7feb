"""bn_adapt (utils/bn_adapt.py): BatchNorm running statistics re-estimated on the training images, on real
Fashion-MNIST sample PNGs; unreadable files are left out, and a folder with nothing readable keeps the old ones."""
import os

import torch
import yaml
from eval_helpers import link_sample_split
from PIL import Image
from test_train import TINY

import train
from models import build_model
from utils.bn_adapt import adapt_batchnorm
from utils.data import build_eval_transform

PRE = {"img_size": 32, "resize_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _train_images(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs)


def test_running_mean_is_the_mean_of_the_first_layer_over_the_training_images(tmp_path):
    data = link_sample_split(str(tmp_path / "d"), 4, 1, None)  # 10 classes x 4 = 40 images
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=10, width_mult=0.25)
    bn = model.features[0][1]
    bn.running_mean.fill_(5.0)
    report = adapt_batchnorm(model, data, PRE, batch_size=8, workers=0, device=torch.device("cpu"))
    assert report == {"images": 40, "layers": sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())}
    tf = build_eval_transform(PRE)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in _train_images(data)])
    with torch.no_grad():
        conv = model.features[0][0](x)
    # five equal batches of 8: the average of the batch means is the mean over all 40 images
    assert torch.allclose(bn.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, conv.var(dim=(0, 2, 3)), rtol=0.2)  # mean of per-batch variances
    assert bn.momentum == 0.1 and model.training and bn.training  # settings restored (a fresh model trains)


def test_unreadable_images_are_left_out_and_none_readable_keeps_the_statistics(tmp_path):
    data = link_sample_split(str(tmp_path / "d"), 2, 1, ["Bag", "Coat"])
    broken = os.path.join(data, "train", "Bag", "broken.png")
    with open(broken, "wb") as f:
        f.write(b"not a png")
    model = build_model("mobilenet_v2", num_classes=2, width_mult=0.25)
    assert adapt_batchnorm(model, data, PRE, 2, 0, torch.device("cpu"))["images"] == 4
    for c in ("Bag", "Coat"):  # now nothing is readable
        for f in os.listdir(os.path.join(data, "train", c)):
            path = os.path.join(data, "train", c, f)
            os.remove(path)
            with open(path, "wb") as fh:
                fh.write(b"truncated")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert adapt_batchnorm(model, data, PRE, 4, 0, torch.device("cpu"))["images"] == 0
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_train_py_adapts_a_pretrained_fresh_run_and_records_it(tmp_path, capsys):
    data = link_sample_split(str(tmp_path / "d"), 4, 2, ["Bag", "Coat", "Sandal"])
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(build_model("mobilenet_v2", num_classes=3, width_mult=0.25).state_dict(), weights)
    out = tmp_path / "run"
    train.main(TINY + ["--data", data, "--epochs", "1", "--pretrained", str(weights), "--out", str(out),
                       "--set", "bn_adapt=true"])
    assert "BatchNorm statistics re-estimated on 12 training images" in capsys.readouterr().out
    with open(out / "config.yaml") as f:
        assert yaml.safe_load(f)["bn_adapted"]["images"] == 12


def _adapt_in_process(rank: int, data: str, store: str, out: str) -> None:
    """One of two gloo processes (as under torchrun): adapt a seeded model on its share, rank 0 saves the result."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_model("mobilenet_v2", num_classes=2, width_mult=0.25)
        report = adapt_batchnorm(model, data, PRE, 2, 0, torch.device("cpu"), rank=rank, world_size=2)
        if rank == 0:
            torch.save({"report": report, "state": model.state_dict()}, out)
    finally:
        tdist.destroy_process_group()


def test_two_processes_weight_by_images_seen_so_an_empty_share_adds_nothing(tmp_path):
    # 3 training images, 2 processes, batch 2: rank 0 reads Bag/0 + Coat/0 (one batch), rank 1 only Bag/1, a single
    # image, which has no batch statistics, so rank 1 keeps the pretrained ones. An equal-share average would mix
    # them in half and half; the weighted one equals one process over rank 0's two images.
    data = link_sample_split(str(tmp_path / "d"), {"Bag": 2, "Coat": 1}, 0)
    alone = tmp_path / "alone"
    for c, f in (("Bag", 0), ("Coat", 0)):
        src = sorted(os.listdir(os.path.join(data, "train", c)))[f]
        os.makedirs(alone / "train" / c)
        os.symlink(os.path.join(data, "train", c, src), alone / "train" / c / src)
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.spawn(_adapt_in_process, args=(data, str(tmp_path / "store"), out), nprocs=2)
    got = torch.load(out)
    torch.manual_seed(0)
    expected = build_model("mobilenet_v2", num_classes=2, width_mult=0.25)
    pretrained = {k: v.clone() for k, v in expected.state_dict().items() if "running" in k}
    assert adapt_batchnorm(expected, str(alone), PRE, 2, 0, torch.device("cpu"))["images"] == 2
    assert got["report"]["images"] == 2
    for k, v in expected.state_dict().items():
        if "running" in k:
            assert torch.allclose(got["state"][k], v, rtol=1e-5, atol=1e-6), k
            assert not torch.allclose(v, pretrained[k]), k  # the images did move every statistic
