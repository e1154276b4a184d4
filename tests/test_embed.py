"""`relicv2 embed` (files for other tools) and the attributes of the features cache."""

import csv

import h5py
import numpy as np
import torch
from safetensors.torch import save_file

from relicv2_cli.artifacts import Staging
from relicv2_cli.data import load_dataset
from relicv2_cli.encoders import load_encoder
from relicv2_cli.features import extract_features, read_features
from relicv2_cli.models import build_resnet
from relicv2_cli.stages.embed import write_embeddings

DATA = ("synthetic", "--limit-train", "24", "--limit-test", "12", "--image-size", "16")


def make_pretrain(workdir):
    torch.manual_seed(0)
    model = build_resnet("resnet18", 0.25, "cifar")
    with Staging(workdir, "pretrain", "tiny") as staging:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging.dir / "backbone.safetensors"))
        return staging.commit(config={"arch": "resnet18", "width": 0.25, "stem": "cifar", "image_size": 16,
                                      "method": "relicv2"})


def test_embed_writes_every_format_with_labels_and_attributes(tmp_path, cli):
    art = make_pretrain(tmp_path / "runs")
    dataset = load_dataset("synthetic", limit_train=24, limit_test=12, image_size=16)
    h5 = tmp_path / "train.h5"
    result = cli("embed", art.path, *DATA, "--out", h5, "--precision", "fp32")
    assert result.code == 0, result.err
    assert result.last_line == str(h5)
    with h5py.File(h5) as f:
        embeddings, labels, attrs = f["embeddings"][...], f["labels"][...], dict(f.attrs)
        assert f["indices"][...].tolist() == list(range(24))
    assert embeddings.shape == (24, 128) and embeddings.dtype == np.float32
    assert np.array_equal(labels, dataset.train.labels)
    assert attrs["encoder"] == "pretrain/tiny (relicv2)" and attrs["digest"] == art.digest
    assert attrs["split"] == "train" and attrs["dataset"] == "synthetic" and attrs["image_size"] == 16
    assert list(attrs["class_names"]) == dataset.class_names
    # The same numbers as the evaluations' features cache (same view, same precision).
    cached = read_features(extract_features(load_encoder(art.path), dataset, "train", precision="fp32",
                                            workdir=tmp_path / "runs", quiet=True, device="cpu"))
    np.testing.assert_allclose(embeddings, cached.features, rtol=1e-6, atol=1e-6)

    test_npy = tmp_path / "test.npy"
    assert cli("embed", art.path, *DATA, "--split", "test", "--format", "npy", "--out", test_npy).code == 0
    assert np.load(test_npy).shape == (12, 128)
    table = tmp_path / "train.csv"
    assert cli("embed", art.path, *DATA, "--format", "csv", "--out", table, "--precision", "fp32").code == 0
    rows = list(csv.reader(table.open()))
    assert rows[0][:3] == ["index", "label", "f0"] and len(rows[0]) == 2 + 128 and len(rows) == 1 + 24
    assert [int(r[1]) for r in rows[1:]] == dataset.train.labels.tolist()
    np.testing.assert_allclose(np.array([r[2:] for r in rows[1:]], dtype=np.float32), embeddings, rtol=1e-6)
    pt = tmp_path / "train.pt"
    assert cli("embed", art.path, *DATA, "--format", "torch", "--out", pt).code == 0
    payload = torch.load(pt, weights_only=True)
    assert payload["embeddings"].shape == (24, 128)
    assert payload["labels"].tolist() == dataset.train.labels.tolist()
    assert payload["metadata"]["digest"] == art.digest
    assert payload["metadata"]["class_names"] == dataset.class_names

    again = cli("embed", art.path, *DATA, "--out", h5)
    assert again.code == 2 and f"{h5} exists (use --force to replace it)" in again.err
    wrong = cli("embed", art.path, *DATA, "--format", "csv", "--out", tmp_path / "x.h5")
    assert wrong.code == 2 and "--out for --format csv must end in .csv" in wrong.err


def test_unlabelled_embeddings_have_no_label_fields(tmp_path):
    """Data without labels (labels=None) gives embeddings and indices only."""
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_embeddings(tmp_path / "u.h5", "h5", x, None, {"split": "train"})
    with h5py.File(tmp_path / "u.h5") as f:
        assert sorted(f) == ["embeddings", "indices"] and f.attrs["split"] == "train"
    write_embeddings(tmp_path / "u.csv", "csv", x, None, {})
    assert (tmp_path / "u.csv").read_text().splitlines() == ["index,f0,f1", "0,0,1", "1,2,3", "2,4,5"]


def test_features_h5_carries_encoder_split_and_class_names(tmp_path):
    dataset = load_dataset("synthetic", limit_train=20, limit_test=10, image_size=16)
    encoder = load_encoder("random:resnet18", width=0.25, stem="cifar")
    art = extract_features(encoder, dataset, "test", workdir=tmp_path, quiet=True, device="cpu")
    with h5py.File(art.path / "features.h5") as f:
        attrs = dict(f.attrs)
    assert attrs["encoder"] == "random:resnet18" and attrs["split"] == "test"
    assert attrs["dataset"] == "synthetic"
    assert attrs["digest"] == encoder.key and list(attrs["class_names"]) == dataset.class_names
