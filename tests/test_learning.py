"""Learning that beats random init: short RELICv2 pretrains against the same network untrained.

On `synthetic` (no external data): 3,000 images at 16 px, ResNet-18 width 0.25, 368 steps of batch
64 (8 epochs, target EMA from 0.96), for seeds 0 and 1. Measured with the default recipe on a 2-core
AMD EPYC (one thread, machine shared: about 145 s a seed): kNN 62.7% against 32.0% for random init
with seed 0 (+30.7 points), 59.9% against 33.9% with seed 1 (+26.0); the test asks for +10 on each seed.

On CIFAR-10 (needs RELICV2_DATA): 10,000 images at 16 px, 156 steps of batch 256 (4 epochs): kNN
36.9% against 26.8% for random init with seed 0 (+10.1 points), 37.6% against 24.7% with seed 1
(+12.9); that test asks for +5. The recipe before BYOL's colour jitter, per-view BatchNorm and
bias-free heads became the defaults gave +8.4 and +13.7 on the same runs (synthetic: +23.9, +19.5).
"""

import pytest
import torch

from relicv2_cli.data import load_dataset
from relicv2_cli.knn import encode_images, knn_accuracy
from relicv2_cli.models import build_resnet
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain


def _knn_gain(spec: str, data: dict, seed: int, workdir, **train) -> tuple[float, float]:
    """kNN top-1 of a short RELICv2 pretrain and of the same network at its random init."""
    cfg = PretrainConfig(spec=spec, **data, large_size=data["image_size"], small_crops=0, width=0.25,
                         warmup_epochs=0.5, eval_every=0, proj_hidden=1024, proj_dim=128, seed=seed,
                         **train)
    trained = run_pretrain(cfg, workdir=workdir, name=f"s{seed}", quiet=True).metrics["knn_top1"]

    torch.manual_seed(seed)
    dataset = load_dataset(spec, **data, seed=seed)
    encoder = build_resnet("resnet18", 0.25, "cifar")
    embed = dict(image_size=data["image_size"], device=torch.device("cpu"))
    random_init = knn_accuracy(encode_images(encoder, dataset.train.images, **embed), dataset.train.labels,
                               encode_images(encoder, dataset.test.images, **embed), dataset.test.labels, 10)
    return trained, random_init


@pytest.mark.parametrize("seed", [0, 1])
def test_short_relicv2_pretrain_beats_random_init_on_synthetic(tmp_path, seed):
    torch.set_num_threads(2)  # convolution-bound; the conftest fixture restores the count
    data = dict(limit_train=3000, limit_test=1000, image_size=16)
    trained, random_init = _knn_gain("synthetic", data, seed, tmp_path, batch_size=64, epochs=8, ema_base=0.96)
    assert trained >= random_init + 0.10, f"seed {seed}: RELICv2 kNN {trained:.3f} vs random init {random_init:.3f}"


def test_short_relicv2_pretrain_beats_random_init_on_cifar10(cifar_dir, tmp_path):
    torch.set_num_threads(2)
    data = dict(limit_train=10000, limit_test=1000, image_size=16)
    trained, random_init = _knn_gain(f"cifar10:{cifar_dir}", data, 0, tmp_path, batch_size=256, epochs=4)
    assert trained >= random_init + 0.05, f"RELICv2 kNN {trained:.3f} vs random init {random_init:.3f}"
