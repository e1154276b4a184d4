"""`relicv2 export` and `relicv2_cli.load_backbone`: round trips into torchvision, online vs EMA target,
refusals."""

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import relicv2_cli
from relicv2_cli.artifacts import Staging
from relicv2_cli.encoders import load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.models import build_network, build_resnet
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain


def features64(model, x):
    """Pooled features in float64, eval mode (BN on its running statistics)."""
    return model.double().eval()(x.double())


def torchvision_model(arch, path):
    """The one-liner of docs/export.md."""
    m = getattr(torchvision.models, arch)()
    m.fc = torch.nn.Identity()
    m.load_state_dict(torch.load(path, weights_only=True))
    return m


def fake_pretrain(workdir, name, arch, width, stem, method="relicv2", with_target=True):
    """A pretrain artifact as the stage writes it: online backbone + checkpoint.pt whose `target`
    is an SSLNetwork state_dict (encoder.*, projector.*), with BN statistics that are not the init's."""
    torch.manual_seed(1)
    online = build_resnet(arch, width, stem)
    target = build_network(arch, width, stem, hidden_dim=32, out_dim=16, predictor=False)
    for model in (online, target):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    with Staging(workdir, "pretrain", name) as staging:
        state = {k: v.contiguous() for k, v in online.state_dict().items()}
        save_file(state, str(staging.dir / "backbone.safetensors"))
        if with_target:
            torch.save({"step": 1, "target": target.state_dict() if method != "supervised" else {}},
                       staging.dir / "checkpoint.pt")
        return staging.commit(config={"arch": arch, "width": width, "stem": stem, "image_size": 32,
                                      "method": method})


def test_export_round_trips_into_torchvision_resnet18_online_and_target(tmp_path, cli):
    cfg = PretrainConfig(spec="synthetic", limit_train=16, limit_test=16, arch="resnet18", width=1.0,
                         stem="imagenet", proj_hidden=64, proj_dim=32, batch_size=8, n_negatives=4,
                         epochs=2.0,
                         warmup_epochs=0.5, log_every=1, eval_every=0, max_steps=2,
                         precision="fp32")  # bf16 on 1 thread: NaN weights
    art = run_pretrain(cfg, workdir=tmp_path / "runs", quiet=True)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = {}
    for network in ("online", "target"):
        for fmt, suffix in (("torchvision", "pth"), ("timm", "pth"), ("safetensors", "safetensors")):
            path = tmp_path / f"{network}-{fmt}.{suffix}"
            result = cli("export", art.path, "--network", network, "--format", fmt, "--out", path)
            assert result.code == 0, result.err
            assert result.last_line == str(path)
            out[network, fmt] = path

    # The reference target encoder, read independently from checkpoint.pt.
    saved = torch.load(art.path / "checkpoint.pt", weights_only=True)["target"]
    target_ref = build_resnet("resnet18", 1.0, "imagenet")
    target_ref.load_state_dict({k[len("encoder."):]: v for k, v in saved.items() if k.startswith("encoder.")})
    refs = {"online": features64(load_encoder(art.path).model, x), "target": features64(target_ref, x)}
    assert (refs["online"] - refs["target"]).abs().max() > 1e-4  # the EMA target is another network

    for network, ref in refs.items():
        tv = features64(torchvision_model("resnet18", out[network, "torchvision"]), x)
        assert (tv - ref).abs().max() < 1e-5
        for fmt in ("torchvision", "timm", "safetensors"):
            backbone = relicv2_cli.load_backbone(out[network, fmt])
            assert backbone.metadata["network"] == network and backbone.metadata["digest"] == art.digest
            assert backbone.metadata["image_size"] == 32
            assert backbone.metadata["mean"] == [0.485, 0.456, 0.406]
            assert (features64(backbone, x) - ref).abs().max() < 1e-5
    # timm's ResNet uses torchvision's key names: the two files hold the same tensors.
    tv_state = torch.load(out["online", "torchvision"], weights_only=True)
    timm_state = torch.load(out["online", "timm"], weights_only=True)
    assert tv_state.keys() == timm_state.keys() and not any(k.startswith("fc.") for k in tv_state)
    assert timm_state.relicv2_metadata["format"] == "timm"


def test_export_resnet50_loads_into_torchvision(tmp_path, cli):
    art = fake_pretrain(tmp_path / "runs", "r50", "resnet50", 1.0, "imagenet")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    online_ref = features64(load_encoder(art.path).model, x)
    for network in ("online", "target"):
        path = tmp_path / f"{network}.pth"
        result = cli("export", art.path, "--network", network, "--format", "torchvision", "--out", path)
        assert result.code == 0
        tv = features64(torchvision_model("resnet50", path), x)
        if network == "online":
            assert (tv - online_ref).abs().max() < 1e-5
        else:
            assert (tv - online_ref).abs().max() > 1e-3  # another seed's weights and BN statistics
            assert (tv - features64(relicv2_cli.load_backbone(path), x)).abs().max() < 1e-5


def test_export_refusals(tmp_path, cli):
    small = fake_pretrain(tmp_path / "runs", "small", "resnet18", 0.25, "cifar")
    out = tmp_path / "small.pth"
    result = cli("export", small.path, "--format", "torchvision", "--out", out)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert ("cannot export as --format torchvision: torchvision's resnet18 has another shape (its cifar "
            "stem is a 3x3 stride-1 conv1 without max-pool (theirs: 7x7 stride 2 + max-pool); its width 0.25 "
            "gives 16 stem channels (theirs: 64)); use --format safetensors") in result.err
    assert not out.exists()

    # The toolkit's own layout takes any shape and reloads to the same network.
    st = tmp_path / "small.safetensors"
    assert cli("export", small.path, "--out", st).code == 0
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    reloaded = features64(relicv2_cli.load_backbone(st), x)
    assert torch.equal(reloaded, features64(load_encoder(small.path).model, x))
    again = cli("export", small.path, "--out", st)
    assert again.code == 2 and f"{st} exists (use --force to replace it)" in again.err
    assert cli("export", small.path, "--out", st, "--force", "--network", "target").code == 0
    assert relicv2_cli.load_backbone(st).metadata["network"] == "target"

    r200 = fake_pretrain(tmp_path / "runs", "r200", "resnet200", 1.0, "imagenet", with_target=False)
    bad = cli("export", r200.path, "--format", "torchvision", "--out", tmp_path / "r200.pth")
    assert bad.code == 2 and "torchvision has no resnet200" in bad.err
    no_ckpt = cli("export", r200.path, "--network", "target", "--out", tmp_path / "r200.safetensors")
    assert no_ckpt.code == 2 and "has no file 'checkpoint.pt'" in no_ckpt.err
    sup = fake_pretrain(tmp_path / "runs", "sup", "resnet18", 0.25, "cifar", method="supervised")
    no_target = cli("export", sup.path, "--network", "target", "--out", tmp_path / "sup.safetensors")
    assert no_target.code == 2 and "(supervised) has no EMA target network" in no_target.err
    suffix = cli("export", small.path, "--format", "timm", "--out", tmp_path / "x.safetensors")
    assert suffix.code == 2 and "--out for --format timm must end in .pth or .pt" in suffix.err

    plain = tmp_path / "plain.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    with pytest.raises(RelicError, match="not written by `relicv2 export`"):
        relicv2_cli.load_backbone(plain)
