"""The pieces every loader shares: EpochPlan (epochs, resume, state), the host-side augmentation parameters
(a pure function of seed, rank, epoch and position), the header size reader, and build_loader's device choice."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dermfast.data import loader as loader_mod
from dermfast.data.augment import Augment, image_size, sample_train_params, sample_uniforms
from dermfast.data.loader import EpochPlan, build_loader, cuda_index
from dermfast.data.records import ImageRecords
from dermfast.data.sampler import BalancedSampler


def test_uniforms_are_a_pure_function_of_seed_rank_epoch_position():
    u = sample_uniforms(1, 0, 2, np.arange(100))
    assert u.shape == (100, 45) and (u >= 0).all() and (u < 1).all()
    assert np.array_equal(sample_uniforms(1, 0, 2, np.arange(40, 60)), u[40:60])  # any batch split
    for other in [(2, 0, 2), (1, 1, 2), (1, 0, 3)]:
        assert np.abs(sample_uniforms(*other, np.arange(100)) - u).mean() > 0.2  # independent draws
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.3


def test_train_params_follow_random_resized_crop():
    aug = Augment(size=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5, brightness=0.4, hue=0.1)
    n = 20000
    w = np.where(np.arange(n) % 2, 1024, 300)
    h = np.where(np.arange(n) % 2, 768, 900)
    p = sample_train_params(aug, 3, 1, 0, np.arange(n), w, h)
    assert (p["x"] >= 0).all() and (p["y"] >= 0).all() and (p["w"] >= 1).all() and (p["h"] >= 1).all()
    assert (p["x"] + p["w"] <= w).all() and (p["y"] + p["h"] <= h).all()
    area = p["w"] * p["h"] / (w * h)
    fitted = area < 0.999
    assert area[fitted].min() >= 0.07 and abs(p["flip"].mean() - 0.5) < 0.02
    assert np.all((p["w"] / p["h"])[fitted] > 0.74) and np.all((p["w"] / p["h"])[fitted] < 1.34)
    assert p["brightness"].min() >= 0.6 and p["brightness"].max() <= 1.4
    assert np.all(p["contrast"] == 1) and np.abs(p["hue"]).max() <= 0.1
    # a tall 300 x 900 image often fits no window at the wide end: torchvision's fallback, the ratio clamped
    tall = sample_train_params(Augment(scale=(0.99, 1.0), ratio=(1.0, 1.0)), 0, 0, 0, [0], [300], [900])
    assert (tall["w"][0], tall["h"][0], tall["x"][0], tall["y"][0]) == (300, 300, 0, 300)


@pytest.mark.parametrize("fmt, kw", [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("BMP", {})])
def test_image_size_from_the_header(fmt, kw):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation "rotate 90": ignored, the stored grid is what the loaders crop
    Image.new("RGB", (123, 45)).save(buf, fmt, **kw, **({"exif": exif} if fmt == "JPEG" else {}))
    assert image_size(buf.getvalue()) == (123, 45)


def test_image_size_rejects_garbage():
    with pytest.raises(ValueError, match="size"):
        image_size(b"not an image at all")


def test_plan_state_resume_and_set_epoch():
    sampler = BalancedSampler(np.array([0] * 7 + [1] * 3), class_fractions="equal", seed=1)
    plan = EpochPlan(10, 4, train=True, sampler=sampler, seed=9)
    assert plan.begin() == (0, 0, 2)  # 10 samples, batches of 4, last partial dropped
    plan.advance(4)
    state = json.loads(json.dumps(plan.state_dict()))
    assert state["epoch"] == 0 and state["position"] == 4 and state["seed"] == 9
    assert state["sampler"]["position"] == 4 and state["sampler"]["seed"] == 1
    plan.finish()
    assert plan.epoch == 1 and plan.start == 0

    other = EpochPlan(10, 4, train=True, sampler=BalancedSampler(sampler_labels(), class_fractions="equal", seed=1),
                      seed=9)
    other.load_state_dict(state)
    other.set_epoch(0)  # the pending epoch: the resume position stays
    assert other.begin() == (0, 4, 1)
    assert other.sampler.position == 4
    other.set_epoch(3)
    assert other.epoch == 3 and other.start == 0
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict({**state, "seed": 10})
    other.load_state_dict(sampler.state_dict(consumed=8))  # a bare sampler state, as older checkpoints hold
    assert other.begin() == (0, 8, 0)


def sampler_labels():
    return np.array([0] * 7 + [1] * 3)


def test_plan_follows_a_sampler_restored_by_its_owner():
    sampler = BalancedSampler(sampler_labels(), seed=1)
    sampler.load_state_dict({"seed": 1, "epoch": 2, "position": 3, "rank": 0, "world_size": 1})
    plan = EpochPlan(10, 3, train=False, sampler=sampler)
    assert plan.begin() == (2, 3, 3)  # eval keeps the partial batch: 7 left -> 3 batches


def test_cuda_without_an_index_is_the_current_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert cuda_index(torch.device("cuda")) == 3
    assert cuda_index(torch.device("cuda", 1)) == 1
    seen = {}

    class FakeDali:
        def __init__(self, *args, **kw):
            seen.update(kw)

    monkeypatch.setattr(loader_mod._optional, "HAS_DALI", True)
    import dermfast.data.dali_loader as dl
    monkeypatch.setattr(dl, "DaliLoader", FakeDali)
    rec = ImageRecords(["a.jpg"], np.zeros(1, np.int64), ["x"])
    build_loader(rec, Augment(size=8), 1, train=False, loader="dali-gpu", device="cuda")
    assert seen["device"] == "gpu" and seen["device_id"] == 3
    build_loader(rec, Augment(size=8), 1, train=False, loader="dali-gpu", device="cuda:1", workers=5)
    assert seen["device_id"] == 1 and seen["num_threads"] == 5
