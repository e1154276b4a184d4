"""Learning that beats random init: short RELICv2 pretrains against the same network untrained.

On `synthetic` (no external data): 3,000 images at 16 px, ResNet-18 width 0.25, 184 steps of batch 64
(4 epochs, target EMA from 0.96), seed 0, shared with tests/test_semi.py (`synthetic_pretrain` in
conftest.py); `make bench-learning` runs seed 1 too (the suite must stay under 10 minutes on a slow
2-core host). Measured with the default recipe on a 2-core Intel Xeon (two threads: 20-40 s a seed):
kNN 55.0% against 32.3% for random init with seed 0 (+22.7 points), 53.2% against 33.9% with seed 1
(+19.3); the test asks for +10. Three epochs gave +18.3 / +11.3, too close to the margin; `make demo` runs the same network for 8 epochs.

On CIFAR-10 (needs RELICV2_DATA): 10,000 images at 16 px, 78 steps of batch 128 (1 epoch): kNN 37.8%
against 26.9% for random init with seed 0 (+10.9 points), 35.5% against 24.9% with seed 1 (+10.6);
that test asks for +5 (78 steps of batch 256 gave +8.2 / +9.9 at twice the cost). Rerun both with
`make bench-learning`.
"""

import torch

from relicv2_cli.data import load_dataset
from relicv2_cli.knn import encode_images, knn_accuracy
from relicv2_cli.models import build_resnet
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain

SYNTHETIC = dict(limit_train=3000, limit_test=1000, image_size=16)
SYNTHETIC_TRAIN = dict(batch_size=64, epochs=4, ema_base=0.96)
CIFAR = dict(limit_train=10000, limit_test=1000, image_size=16)
CIFAR_TRAIN = dict(batch_size=128, epochs=1)


def short_pretrain(spec: str, data: dict, seed: int, workdir, **train):
    """A short RELICv2 run at data["image_size"], ResNet-18 w0.25, no small crops; returns the artifact."""
    cfg = PretrainConfig(spec=spec, **data, large_size=data["image_size"], small_crops=0, width=0.25,
                         warmup_epochs=0.5, eval_every=0, proj_hidden=1024, proj_dim=128, seed=seed,
                         **train)
    return run_pretrain(cfg, workdir=workdir, name=f"s{seed}", quiet=True)


def random_init_knn(spec: str, data: dict, seed: int) -> float:
    """kNN top-1 of the same network at its random init (seeded as the pretrain's)."""
    torch.manual_seed(seed)
    dataset = load_dataset(spec, **data, seed=seed)
    encoder = build_resnet("resnet18", 0.25, "cifar")
    embed = dict(image_size=data["image_size"], device=torch.device("cpu"))
    return knn_accuracy(encode_images(encoder, dataset.train.images, **embed), dataset.train.labels,
                        encode_images(encoder, dataset.test.images, **embed), dataset.test.labels, 10)


def knn_gain(spec: str, data: dict, seed: int, workdir, **train) -> tuple[float, float]:
    """kNN top-1 of a short RELICv2 pretrain and of the same network at its random init."""
    trained = short_pretrain(spec, data, seed, workdir, **train).metrics["knn_top1"]
    return trained, random_init_knn(spec, data, seed)


def test_short_relicv2_pretrain_beats_random_init_on_synthetic(synthetic_pretrain):
    trained = synthetic_pretrain.metrics["knn_top1"]
    random_init = random_init_knn("synthetic", SYNTHETIC, 0)
    assert trained >= random_init + 0.10, f"RELICv2 kNN {trained:.3f} vs random init {random_init:.3f}"


def test_short_relicv2_pretrain_beats_random_init_on_cifar10(cifar_dir, tmp_path):
    torch.set_num_threads(2)
    trained, random_init = knn_gain(f"cifar10:{cifar_dir}", CIFAR, 0, tmp_path, **CIFAR_TRAIN)
    assert trained >= random_init + 0.05, f"RELICv2 kNN {trained:.3f} vs random init {random_init:.3f}"
