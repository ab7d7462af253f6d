"""Outputs are complete or absent: `prepare` and `export` killed or failing midway leave nothing that
would be read as a complete data set or model, and training refuses a shard folder without its manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

import vistralv_ray.data.prepare as prepare_module
from vistralv_ray.cli.main import main
from vistralv_ray.data import storage
from vistralv_ray.data.pipeline import shard_files
from vistralv_ray.data.prepare import PrepareOptions, TooManyRejections, prepare


def qa(question="<image>\nMàu gì?", answer="Màu đỏ."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture()
def corpus(tmp_path):
    """Ten good records (five shards of two) and their image folder."""
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(root / "a.jpg")
    src = tmp_path / "data.json"
    src.write_text(json.dumps([{"id": f"r{i}", "image": "a.jpg", "conversations": qa()} for i in range(10)]))
    return src, root


def opts(root, out, **kw) -> PrepareOptions:
    return PrepareOptions(str(root), str(out), shard_size=2, **kw)


def files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_a_write_failing_midway_leaves_no_output(tmp_path, corpus, monkeypatch):
    src, root = corpus
    real, written = storage.write_bytes, []

    def failing(uri, data):
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        real(uri, data)
        written.append(uri)

    monkeypatch.setattr(storage, "write_bytes", failing)
    with pytest.raises(OSError, match="No space left"):
        prepare(src, opts(root, tmp_path / "new"), parallel=False, progress=False)
    assert not (tmp_path / "new").exists()  # created by the run, removed by it
    (tmp_path / "empty").mkdir()
    written.clear()
    with pytest.raises(OSError, match="No space left"):
        prepare(src, opts(root, tmp_path / "empty"), parallel=False, progress=False)
    assert (tmp_path / "empty").is_dir() and files(tmp_path / "empty") == []  # given empty, left empty


def test_an_interrupt_midway_leaves_no_output(tmp_path, corpus, monkeypatch):
    src, root = corpus
    real, calls = prepare_module.build_shard, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(prepare_module, "build_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, opts(root, tmp_path / "out"), parallel=False, progress=False)
    assert not (tmp_path / "out").exists()


KILLED_MIDWAY = """
import os, signal, sys
from vistralv_ray.data import storage
from vistralv_ray.data.prepare import PrepareOptions, prepare

renames = []
real = os.replace
def replace(src, dst):
    if len(renames) == 2:  # the third shard is written under its temporary name, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
    renames.append(dst)
storage.os.replace = replace
prepare(sys.argv[1], PrepareOptions(sys.argv[2], sys.argv[3], shard_size=2), parallel=False, progress=False)
"""


def test_a_prepare_killed_midway_is_never_read_as_prepared_data(tmp_path, corpus):
    src, root = corpus
    out = tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_MIDWAY))
    proc = subprocess.run([sys.executable, str(script), str(src), str(root), str(out)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = files(out)
    assert "part-00000.parquet" in left and "manifest.json" not in left
    assert any(name.startswith(".part-00002.parquet.tmp-") for name in left)
    # Training and eval take their shard list from the manifest: without one, the folder is refused.
    with pytest.raises(FileNotFoundError, match=rf"{out} holds .parquet files but no manifest.json"):
        shard_files([str(out)])
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        shard_files([str(tmp_path)])  # also when it is a sub-folder of the path given
    # And prepare does not write into it (nor mix a new run's shards with the old ones).
    with pytest.raises(FileExistsError, match="is not empty"):
        prepare(src, opts(root, out), parallel=False, progress=False)


def test_only_the_shards_a_manifest_lists_are_read(tmp_path, corpus):
    src, root = corpus
    out = tmp_path / "out"
    manifest = prepare(src, opts(root, out), parallel=False, progress=False)
    (out / ".part-00001.parquet.tmp-0123456789ab").write_bytes(b"half a shard")
    (out / "part-00099.parquet").write_bytes((out / "part-00000.parquet").read_bytes())
    assert shard_files([str(out)]) == [str(out / s["name"]) for s in manifest["shards"]]
    (out / "part-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="part-00001.parquet of its manifest.json is missing"):
        shard_files([str(out)])


def test_a_failed_rename_leaves_neither_the_file_nor_a_temporary(tmp_path, monkeypatch):
    target = tmp_path / "dir" / "file.bin"
    storage.write_bytes(str(target), b"old")

    def broken(src, dst):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(storage.os, "replace", broken)
    with pytest.raises(OSError, match="I/O error"):
        storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old" and files(tmp_path / "dir") == ["file.bin"]


def test_a_non_empty_output_directory_is_refused(tmp_path, corpus):
    src, root = corpus
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        prepare(src, opts(root, tmp_path / "out"), parallel=False, progress=False)
    assert files(tmp_path / "out") == ["notes.txt"]


def test_too_many_rejections_stop_prepare_early_and_leave_nothing(tmp_path, corpus, monkeypatch, capsys):
    src, root = corpus
    records = [{"id": f"r{i}", "image": f"{i}.jpg", "conversations": qa()} for i in range(400)]
    src.write_text(json.dumps(records))  # image paths relative to another root than the one given
    shards = []
    real = prepare_module.build_shard
    monkeypatch.setattr(prepare_module, "build_shard", lambda *a: shards.append(1) or real(*a))
    options = PrepareOptions(str(root), str(tmp_path / "out"), shard_size=50, max_rejected_fraction=0.5)
    with pytest.raises(TooManyRejections, match=r"200 of 200 records rejected \(missing_image: 200\)"):
        prepare(src, options, parallel=False, progress=False)
    assert len(shards) == 4 and not (tmp_path / "out").exists()  # stopped at 200 of 400, removed its shards
    args = ["prepare", "--format", "llava", "--input", str(src), "--image-root", str(root), "--serial"]
    assert main([*args, "--out", str(tmp_path / "cli")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--image-root" in err
    assert not (tmp_path / "cli").exists()
    # Under the limit (or with the limit off), the same corpus is prepared and its rejections counted.
    options.max_rejected_fraction = 1.0
    assert prepare(src, options, parallel=False, progress=False)["rejected"] == {"missing_image": 400}


# --- export ----------------------------------------------------------------------------------------


def fake_export_pieces(monkeypatch, fail_after: int | None):
    """`export` with a stand-in checkpoint and model whose save writes files one by one, failing after
    `fail_after` of them (None: never)."""
    import vistralv_ray.inference.export as export_module

    config = SimpleNamespace(
        train=SimpleNamespace(stage="align"), model=SimpleNamespace(lora=SimpleNamespace(enabled=False))
    )
    config.model.template, config.model.aspect = "vistral", "pad"
    ckpt = SimpleNamespace(uri="run/checkpoint-000002", step=2, config=config, precision="fp32")

    class Checkpoint:
        def __enter__(self):
            return ckpt

        def __exit__(self, *exc):
            return False

    model = SimpleNamespace(to=lambda dtype: None)
    assembled = SimpleNamespace(tokenizer=None, chat_template="", image_seq_length=4)

    def save(model, tokenizer, template, cfg, out, max_shard_size):
        for i, name in enumerate(["config.json", "model-00001.safetensors", "model-00002.safetensors"]):
            if fail_after is not None and i == fail_after:
                raise OSError(28, "No space left on device")
            (Path(out) / name).write_text("new")

    monkeypatch.setattr(export_module, "open_checkpoint", lambda source: Checkpoint())
    monkeypatch.setattr(export_module, "trained_model", lambda c: (model, assembled))
    monkeypatch.setattr(export_module, "save_export", save)
    return export_module.export


def test_an_export_failing_midway_leaves_no_directory_that_looks_complete(tmp_path, monkeypatch):
    export = fake_export_pieces(monkeypatch, fail_after=2)
    with pytest.raises(OSError, match="No space left"):
        export("run", tmp_path / "export")
    assert files(tmp_path) == []  # neither OUT nor a half-written sibling


def test_an_overwriting_export_keeps_the_old_one_until_the_new_one_is_complete(tmp_path, monkeypatch):
    old = tmp_path / "export"
    old.mkdir()
    (old / "config.json").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        fake_export_pieces(monkeypatch, fail_after=None)("run", old)
    with pytest.raises(OSError, match="No space left"):
        fake_export_pieces(monkeypatch, fail_after=1)("run", old, overwrite=True)
    assert files(tmp_path) == ["export", "export/config.json"] and (old / "config.json").read_text() == "old"
    fake_export_pieces(monkeypatch, fail_after=None)("run", old, overwrite=True)
    assert files(old) == ["config.json", "model-00001.safetensors", "model-00002.safetensors", "vistralv_export.json"]
    assert (old / "config.json").read_text() == "new" and files(tmp_path)[0] == "export"
    assert not [p for p in os.listdir(tmp_path) if p != "export"]  # the old copy and the temporary are gone
