"""Encoder specs and the features cache."""

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from relicv2_cli import features as features_lib
from relicv2_cli.artifacts import Staging, load_artifact
from relicv2_cli.data import load_dataset
from relicv2_cli.encoders import load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.features import extract_features, read_features
from relicv2_cli.models import build_resnet

TINY = dict(arch="resnet18", width=0.25, stem="cifar")


def make_pretrain(workdir, name="tiny", seed=0, image_size=16, force=False):
    """A `pretrain` artifact as the pretrain stage writes it (the contract: backbone + config)."""
    torch.manual_seed(seed)
    model = build_resnet("resnet18", 0.25, "cifar")
    with Staging(workdir, "pretrain", name, force=force) as staging:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(staging.dir / "backbone.safetensors"))
        return staging.commit(config={"arch": "resnet18", "width": 0.25, "stem": "cifar",
                                      "image_size": image_size,
                                      "method": "relicv2"})


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("synthetic", limit_train=120, limit_test=40, image_size=16)


def count_forwards(encoder):
    calls = []
    encoder.model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_load_encoder_kinds(tmp_path):
    art = make_pretrain(tmp_path)
    enc = load_encoder(art.path)
    assert enc.label == "pretrain/tiny (relicv2)" and enc.image_size == 16 and enc.feature_dim == 128
    assert enc.record["digest"] == art.digest and enc.parent.digest == art.digest and not enc.model.training
    ref = build_resnet("resnet18", 0.25, "cifar")
    torch.manual_seed(0)
    ref = build_resnet("resnet18", 0.25, "cifar")
    assert torch.equal(enc.model.conv1.weight, ref.conv1.weight)

    a, b = load_encoder("random:resnet18", **{k: v for k, v in TINY.items() if k != "arch"}, seed=1), None
    b = load_encoder("random:resnet18", width=0.25, stem="cifar", seed=1)
    c = load_encoder("random:resnet18", width=0.25, stem="cifar", seed=2)
    assert torch.equal(a.model.conv1.weight, b.model.conv1.weight) and a.key == b.key
    assert not torch.equal(a.model.conv1.weight, c.model.conv1.weight) and a.key != c.key
    assert a.image_size is None and a.parent is None

    # torchvision state_dict: fc.* is dropped, everything else must match.
    state = {**ref.state_dict(), "fc.weight": torch.zeros(10, 128), "fc.bias": torch.zeros(10)}
    torch.save(state, tmp_path / "tv.pth")
    tv = load_encoder(f"torchvision:{tmp_path / 'tv.pth'}", **TINY)
    assert torch.equal(tv.model.conv1.weight, ref.conv1.weight) and tv.record["sha256"]
    with pytest.raises(RelicError,
                       match="does not match the network built from --arch resnet18 --width 1 --stem cifar"):
        load_encoder(f"torchvision:{tmp_path / 'tv.pth'}", arch="resnet18", width=1.0, stem="cifar")
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(RelicError, match="1 unexpected"):
        load_encoder(f"torchvision:{tmp_path / 'extra.pth'}", **TINY)
    del state["layer4.1.bn2.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(RelicError, match="1 missing .*layer4.1.bn2.bias"):
        load_encoder(f"torchvision:{tmp_path / 'missing.pth'}", **TINY)


def test_bad_encoder_specs(tmp_path, tiny_data):
    with pytest.raises(RelicError, match="unknown encoder"):
        load_encoder(tmp_path / "nope")
    with pytest.raises(RelicError, match="--arch must be one of"):
        load_encoder("random:resnet19")
    with pytest.raises(RelicError, match="not found"):
        load_encoder(f"torchvision:{tmp_path / 'none.pth'}")
    feats = extract_features(load_encoder("random:resnet18", width=0.25), tiny_data, "test", workdir=tmp_path,
                             device="cpu", quiet=True)
    with pytest.raises(RelicError, match="expected an artifact of kind 'pretrain', found kind 'features'"):
        load_encoder(feats.path)


def test_features_are_cached_and_reused(tmp_path, tiny_data):
    enc = load_encoder(make_pretrain(tmp_path).path)
    calls = count_forwards(enc)
    art = extract_features(enc, tiny_data, "train", workdir=tmp_path, device="cpu", batch_size=50, quiet=True)
    assert len(calls) == 3  # 120 images in batches of 50
    fs = read_features(art)
    assert fs.features.shape == (120, 128) and fs.features.dtype == np.float32
    assert np.array_equal(fs.labels, tiny_data.train.labels) and np.array_equal(fs.indices, np.arange(120))
    assert art.manifest["parents"][0]["digest"] == enc.parent.digest
    assert art.config["split_fingerprint"] == tiny_data.train.fingerprint and art.config["image_size"] == 16

    # Same encoder, same data (even loaded afresh, with another test limit): no forward pass, same artifact.
    again = load_dataset("synthetic", limit_train=120, limit_test=10, image_size=16)
    reused = extract_features(enc, again, "train", workdir=tmp_path, device="cpu", quiet=True)
    assert len(calls) == 3 and reused.path == art.path and reused.digest == art.digest
    # Other split, other precision or other data: computed.
    extract_features(enc, tiny_data, "train", workdir=tmp_path, device="cpu", precision="fp32", quiet=True)
    assert len(calls) == 4
    # Features match a plain fp32 forward of the centre view (images already at the encoder's size).
    x = torch.from_numpy(tiny_data.train.images[:4]).permute(0, 3, 1, 2)
    from relicv2_cli.augment import center_view

    fp32 = read_features(extract_features(enc, tiny_data, "train", workdir=tmp_path, device="cpu",
                                          precision="fp32", quiet=True))
    assert len(calls) == 4
    with torch.no_grad():
        direct = enc.model(center_view(x, 16)).numpy()
    np.testing.assert_allclose(fp32.features[:4], direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fs.features[:4], direct, rtol=0.1, atol=0.05)  # bf16


def test_features_resize_to_the_training_size(tmp_path, tiny_data):
    enc = load_encoder(make_pretrain(tmp_path, image_size=24).path)
    art = extract_features(enc, tiny_data, "test", workdir=tmp_path, device="cpu", quiet=True)
    assert art.config["image_size"] == 24 and art.config["native_size"] == [16, 16]


def test_features_of_another_encoder_or_data_are_refused(tmp_path, tiny_data):
    a = load_encoder("random:resnet18", width=0.25, seed=0)
    b = load_encoder("random:resnet18", width=0.25, seed=1)
    art = extract_features(a, tiny_data, "test", workdir=tmp_path, device="cpu", quiet=True, name="shared")
    with pytest.raises(RelicError,
                       match=r"features artifact .*shared was made by encoder 'random:resnet18'.*--force"):
        extract_features(b, tiny_data, "test", workdir=tmp_path, device="cpu", quiet=True, name="shared")
    other = load_dataset("synthetic", limit_train=120, limit_test=30, image_size=16)
    with pytest.raises(RelicError, match="was made from other data"):
        extract_features(a, other, "test", workdir=tmp_path, device="cpu", quiet=True, name="shared")
    assert load_artifact(art.path).digest == art.digest  # nothing was written
    replaced = extract_features(b, tiny_data, "test", workdir=tmp_path, device="cpu", quiet=True,
                                name="shared",
                                force=True)
    assert replaced.config["encoder_key"] == b.key != art.config["encoder_key"]

    # A pretrain artifact replaced under the same name: its features are keyed by its weights, so they are
    # recomputed under a new name; an explicit name that holds the old ones is refused.
    p1 = load_encoder(make_pretrain(tmp_path, name="p", seed=0).path)
    old = extract_features(p1, tiny_data, "test", workdir=tmp_path, device="cpu", quiet=True)
    extract_features(p1, tiny_data, "test", workdir=tmp_path, device="cpu", quiet=True, name="pinned")
    p2 = load_encoder(make_pretrain(tmp_path, name="p", seed=1, force=True).path)
    new = extract_features(p2, tiny_data, "test", workdir=tmp_path, device="cpu", quiet=True)
    assert new.path != old.path
    with pytest.raises(RelicError, match="changed since it was recorded"):
        extract_features(p2, tiny_data, "test", workdir=tmp_path, device="cpu", quiet=True, name="pinned")


def test_corrupt_features_file_is_a_clear_error(tmp_path, tiny_data):
    enc = load_encoder("random:resnet18", width=0.25)
    art = extract_features(enc, tiny_data, "test", workdir=tmp_path, device="cpu", quiet=True)
    with h5py.File(art.path / "features.h5", "w") as f:
        f.create_dataset("labels", data=np.zeros(3))
    with pytest.raises(RelicError, match=r"features.h5 has \d+ bytes, its manifest records \d+: damaged"):
        read_features(art)
    # A file that matches its manifest but lacks a dataset.
    with Staging(tmp_path, "features", "odd") as staging:
        with h5py.File(staging.dir / "features.h5", "w") as f:
            f.create_dataset("labels", data=np.zeros(3))
        odd = staging.commit(config={})
    with pytest.raises(RelicError, match="corrupt features.h5"):
        read_features(odd)


def test_features_command(tmp_path, cli):
    result = cli("eval", "features", "random:resnet18", "synthetic", "--split", "test", "--width", "0.25",
                 "--limit-train", "50", "--limit-test", "30", "--image-size", "16", "--workdir", tmp_path,
                 "--device", "cpu", "--quiet")
    assert result.code == 0, result.err
    art = load_artifact(result.last_line, kind="features")
    assert art.config["count"] == 30 and art.config["split"] == "test"
    bad = cli("eval", "features", "random:resnet18", "synthetic", "--split", "val", "--workdir", tmp_path)
    assert bad.code == 2 and "has no validation split" in bad.err
    assert features_lib.SPLITS == ("train", "val", "test")
