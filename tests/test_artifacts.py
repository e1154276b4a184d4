import json

import pytest

from relicv2_cli import artifacts
from relicv2_cli.errors import RelicError


def make(workdir, name="a", payload=b"hello", force=False, parents=(), metrics=None):
    with artifacts.Staging(workdir, "features", name, force=force) as staging:
        (staging.dir / "payload.bin").write_bytes(payload)
        return staging.commit(config={"x": 1}, parents=list(parents), metrics=metrics or {"acc": 0.5},
                              dataset={"spec": "synthetic", "fingerprint": "f"})


def test_manifest_fields_and_file_digests(tmp_path):
    art = make(tmp_path)
    m = json.loads((art.path / "manifest.json").read_text())
    assert m["format"] == "relicv2-artifact" and m["schema"] == 1 and m["kind"] == "features"
    assert set(m) >= {"name", "created", "tool", "command", "config", "parents", "dataset", "files",
                      "metrics", "digest"}
    assert m["files"]["payload.bin"]["bytes"] == 5
    assert m["files"]["payload.bin"]["sha256"] == artifacts.sha256_file(art.path / "payload.bin")
    assert m["digest"] == artifacts.manifest_digest(m)
    assert artifacts.verify_artifact(art.path) == []


def test_interrupted_write_leaves_no_artifact_and_old_one_intact(tmp_path):
    old = make(tmp_path, payload=b"old")
    with pytest.raises(ZeroDivisionError):
        with artifacts.Staging(tmp_path, "features", "a", force=True) as staging:
            (staging.dir / "payload.bin").write_bytes(b"new")
            1 / 0
    assert (old.path / "payload.bin").read_bytes() == b"old"
    assert artifacts.verify_artifact(old.path) == []
    assert not list((tmp_path / "features").glob(".*")), "staging directory left behind"
    with pytest.raises(ZeroDivisionError):
        with artifacts.Staging(tmp_path, "features", "b") as staging:
            (staging.dir / "payload.bin").write_bytes(b"new")
            1 / 0
    assert not (tmp_path / "features" / "b").exists()


def test_overwrite_refused_without_force_and_replaced_with_it(tmp_path):
    make(tmp_path, payload=b"one")
    with pytest.raises(RelicError, match="use --force"):
        make(tmp_path, payload=b"two")
    art = make(tmp_path, payload=b"two", force=True)
    assert (art.path / "payload.bin").read_bytes() == b"two"


def test_resumable_staging_survives_a_crash_and_resumes(tmp_path):
    with pytest.raises(RuntimeError):
        with artifacts.Staging(tmp_path, "pretrain", "p", resumable=True) as staging:
            (staging.dir / "checkpoint.pt").write_bytes(b"step 10")
            raise RuntimeError("crash")
    with pytest.raises(RelicError, match="--resume"):
        artifacts.Staging(tmp_path, "pretrain", "p", resumable=True)
    staging = artifacts.Staging(tmp_path, "pretrain", "p", resumable=True, resume=True)
    assert (staging.dir / "checkpoint.pt").read_bytes() == b"step 10"
    with pytest.raises(RelicError, match="nothing to resume"):
        artifacts.Staging(tmp_path, "pretrain", "q", resumable=True, resume=True)


def test_kind_schema_and_format_errors_name_expected_and_found(tmp_path):
    art = make(tmp_path)
    with pytest.raises(RelicError, match="expected an artifact of kind 'pretrain', found kind 'features'"):
        artifacts.load_artifact(art.path, kind="pretrain")
    m = json.loads((art.path / "manifest.json").read_text())
    m["schema"] = 99
    (art.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RelicError, match="expected schema 1, found 99"):
        artifacts.load_artifact(art.path)
    m["schema"], m["format"] = 1, "other"
    (art.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RelicError, match="expected format 'relicv2-artifact', found 'other'"):
        artifacts.load_artifact(art.path)
    (art.path / "manifest.json").write_text("{not json")
    with pytest.raises(RelicError, match="corrupt manifest"):
        artifacts.load_artifact(art.path)
    with pytest.raises(RelicError, match="not found"):
        artifacts.load_artifact(tmp_path / "nope")


def test_edited_manifest_is_detected(tmp_path):
    art = make(tmp_path)
    m = json.loads((art.path / "manifest.json").read_text())
    m["metrics"]["acc"] = 0.99
    (art.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RelicError, match="digest does not match"):
        artifacts.load_artifact(art.path)


def test_verify_catches_a_changed_byte(tmp_path, cli):
    art = make(tmp_path, payload=b"hello world")
    assert cli("artifacts", "verify", art.path).code == 0
    data = bytearray((art.path / "payload.bin").read_bytes())
    data[3] ^= 1
    (art.path / "payload.bin").write_bytes(bytes(data))
    result = cli("artifacts", "verify", art.path)
    assert result.code != 0
    assert "payload.bin" in result.err and "sha256" in result.err
    assert "Traceback" not in result.err


def test_lineage_lists_parents_and_flags_changed_ones(tmp_path, cli):
    parent = make(tmp_path, name="parent")
    child = make(tmp_path, name="child", parents=[parent])
    grandchild = make(tmp_path, name="grandchild", parents=[child])
    rows = artifacts.lineage(grandchild)
    assert [(depth, entry.name) for depth, entry, _ in rows] == [(0, "grandchild"), (1, "child"),
                                                                 (2, "parent")]
    make(tmp_path, name="parent", payload=b"changed", force=True)
    rows = artifacts.lineage(grandchild)
    assert rows[2][2] == "changed since recorded"
    with pytest.raises(RelicError, match="changed since it was recorded"):
        artifacts.check_parent(artifacts.load_artifact(tmp_path / "features" / "parent"),
                               child.manifest["parents"][0])
    out = cli("artifacts", "lineage", grandchild.path).out
    assert "grandchild" in out and "child" in out and "changed since recorded" in out


def test_ls_and_show(tmp_path, cli):
    make(tmp_path, name="one")
    result = cli("artifacts", "ls", tmp_path)
    assert result.code == 0 and "one" in result.out and "features" in result.out
    shown = json.loads(cli("artifacts", "show", tmp_path / "features" / "one").out)
    assert shown["name"] == "one"
