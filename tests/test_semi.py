"""`eval semi` keeps what pretraining learned: a short synthetic pretrain fine-tuned on a few labels
beats the same recipe from random init, and the frozen probe it reports is fitted on the labels only.

The pretrain is tests/test_learning.py's seed-0 synthetic run (`synthetic_pretrain` in conftest.py:
3,000 images at 16 px, 184 steps of batch 64, default recipe). Fine-tuning, with semi's defaults
(probe head for the pretrain, zero head for random init, crops of at least 30% at 16 px) but 15
epochs, then uses 150 labels (5% of every class) and scores 500 test images. Measured (Intel Xeon):
fine-tuned from the pretrain 50.8% / 36.6% top-1 against 33.0% / 17.8% from random init for seeds 0
/ 1 (+17.8 and +18.8 points; with 30 epochs +19.6 and +15.0 at twice the cost); the test asks for
+8 on each seed.
"""

import numpy as np
import pytest
import torch

from relicv2_cli import probe
from relicv2_cli.data import load_dataset
from relicv2_cli.data.subsets import balanced_subset
from relicv2_cli.encoders import load_encoder
from relicv2_cli.knn import encode_images
from relicv2_cli.stages import semi

DATA = dict(limit_train=3000, limit_test=500, image_size=16)


def _semi(encoder_spec, dataset, workdir, seed, **kw):
    encoder = load_encoder(encoder_spec, width=0.25, seed=seed)
    return semi.run_semi(encoder, dataset, workdir=workdir, fraction=0.05, seed=seed, device="cpu",
                         quiet=True, **kw).metrics


@pytest.mark.parametrize("seed", [0, 1])  # the labelled subset, batch order and crops; one pretrain
def test_finetune_from_pretrained_beats_random_init(synthetic_pretrain, tmp_path, seed):
    dataset = load_dataset("synthetic", **DATA, seed=seed)
    trained = _semi(synthetic_pretrain.path, dataset, tmp_path, seed, epochs=15)
    scratch = _semi("random:resnet18", dataset, tmp_path, seed, epochs=15)
    assert trained["subset_sha256"] == scratch["subset_sha256"] and trained["subset_size"] == 150
    assert trained["top1"] >= scratch["top1"] + 0.08, (seed, trained["top1"], scratch["top1"])


def test_frozen_probe_is_fitted_on_the_labelled_images_only(synthetic_pretrain, tmp_path, monkeypatch):
    dataset = load_dataset("synthetic", **DATA)
    fitted = []
    real = probe.linear_probe

    def spy(train_x, train_y, *args, **kw):
        fitted.append((np.asarray(train_x), np.asarray(train_y)))
        return real(train_x, train_y, *args, **kw)

    monkeypatch.setattr(semi, "linear_probe", spy)
    m = _semi(synthetic_pretrain.path, dataset, tmp_path, 0, epochs=1)
    indices = balanced_subset(dataset.train.labels, 0.05, 0)
    encoder = load_encoder(synthetic_pretrain.path)
    embed = dict(image_size=16, device=torch.device("cpu"))
    subset_x = encode_images(encoder.model, dataset.train.images[indices], **embed).float().numpy()
    assert len(fitted) == 1
    np.testing.assert_allclose(fitted[0][0], subset_x, rtol=0, atol=1e-5)
    assert np.array_equal(fitted[0][1], dataset.train.labels[indices])
    # The reported number is that probe's score on the test split, by hand: same L2, refit, argmax.
    test_x = encode_images(encoder.model, dataset.test.images, **embed).float().numpy()
    model = probe.fit_logistic(subset_x, dataset.train.labels[indices], m["frozen_linear_l2"], num_classes=10)
    expected = float((model.logits(test_x).argmax(1).numpy() == dataset.test.labels).mean())
    assert m["frozen_linear_top1"] == pytest.approx(expected, abs=1 / 500)
    assert 0 <= m["frozen_linear_top1"] <= m["frozen_linear_top5"] <= 1
