"""relicv2: the RELICv2 self-supervised learning method, end to end, as command-line stages."""

__version__ = "0.1.0"


def load_backbone(path):
    """The ResNet backbone in a file written by `relicv2 export` (any --format) or in a pretrain
    artifact directory, as a `torch.nn.Module` in eval mode on the CPU: `model(x)` maps normalised
    images (B, 3, H, W) to pooled features (B, feature_dim). A file's metadata (arch, width, stem,
    image_size, mean, std, network, artifact digest) is on `model.metadata`.

    Mismatched or foreign files raise `relicv2_cli.errors.RelicError`. torch is imported here, not
    by `import relicv2_cli`, so the command line starts fast.
    """
    from relicv2_cli.backbone import load_backbone as load

    return load(path)
