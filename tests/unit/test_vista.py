"""`prepare` on Vista's published subsets, in their exact column layouts, and on LLaVA-558K JSON.

Every record keeps its image (bytes in the shard), gets exactly one `<image>` at the front of its
first user turn, loses Vista's `<ảnh>` placeholder, or is rejected as `missing_image` and counted;
inputs may be a file, a directory of parts or a glob, local or on S3.
"""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vistralv_ray.cli.main import main
from vistralv_ray.data import sources, storage
from vistralv_ray.data.layouts import SourceError, get_layout
from vistralv_ray.data.prepare import PrepareOptions, prepare

PLACEHOLDER = "<ảnh>"


def photo(path, colour) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), colour).save(path, "JPEG")
    return path.read_bytes()


def chat(question: str, answer: str = "Một con mèo.", second: bool = True) -> list[dict]:
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if second:
        turns += [{"role": "user", "content": "Nó màu gì?"}, {"role": "assistant", "content": "Màu cam."}]
    return turns


def gpt(question: str, answer: str = "Ảnh chụp một con đường.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_parts(folder, name_rows: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in name_rows.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / name)


def run(input_path, root, out, **kw) -> dict:
    opts = PrepareOptions(str(root) if root else None, str(out), shard_size=kw.pop("shard_size", 3), **kw)
    return prepare(input_path, opts, parallel=False, progress=False)


def shard_rows(out, manifest) -> dict[str, dict]:
    return {r["id"]: r for s in manifest["shards"] for r in pq.read_table(out / s["name"]).to_pylist()}


def rejected(out) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}


def assert_one_image_first(messages: list[dict]) -> None:
    assert messages[0]["role"] == "user" and messages[0]["content"].startswith("<image>\n")
    assert sum(m["content"].count("<image>") for m in messages) == 1
    for m in messages:  # in either Unicode form
        assert PLACEHOLDER not in m["content"] and unicodedata.normalize("NFD", PLACEHOLDER) not in m["content"]


@pytest.mark.parametrize(
    "subset", ["vi_llava_conversation", "vi_llava_complex_reasoning", "vi_llava_detail_description"]
)
def test_vi_llava_subsets_take_the_coco_file_name_and_get_one_image_tag(tmp_path, subset):
    coco = tmp_path / "coco" / "train2017"
    cat = photo(coco / "000000000009.jpg", (200, 120, 40))
    dog = photo(coco / "000000000025.jpg", (40, 120, 200))
    rows = [  # Vista's columns: id, file_name, conversation (role/content, no <image> in the text)
        {"id": "9", "file_name": "000000000009.jpg", "conversation": chat("Trong ảnh có gì?")},
        {"id": "25", "file_name": "000000000025.jpg", "conversation": chat("Mô tả bức ảnh.", second=False)},
        {"id": "30", "file_name": "000000000030.jpg", "conversation": chat("Có gì?")},  # not downloaded
        {"id": "31", "file_name": "", "conversation": chat("Có gì?")},
    ]
    write_parts(tmp_path / subset, {"train-00000-of-00001.parquet": rows})
    out = tmp_path / "out"
    m = run(tmp_path / subset / "train-00000-of-00001.parquet", coco, out, fmt="vista", subset=subset)
    assert (m["records_in"], m["records_out"], m["rejected"]) == (4, 2, {"missing_image": 2})
    assert (m["records_with_image"], m["records_text_only"], m["stage"]) == (2, 0, "finetune")
    kept = shard_rows(out, m)
    assert kept["9"]["image"] == cat and kept["25"]["image"] == dog
    for row in kept.values():
        assert_one_image_first(row["messages"])
    assert kept["9"]["messages"][0]["content"] == "<image>\nTrong ảnh có gì?" and len(kept["9"]["messages"]) == 4
    assert set(rejected(out)) == {"30", "31"}


def test_vi_sharegpt4v_directory_of_parts_replaces_the_anh_placeholder(tmp_path):
    data = tmp_path / "sharegpt4v"  # ShareGPT4V's data/ folder: the `image` column is relative to it
    images = {
        "coco/train2017/000000000009.jpg": photo(data / "coco/train2017/000000000009.jpg", (250, 0, 0)),
        "sam/images/sa_1.jpg": photo(data / "sam/images/sa_1.jpg", (0, 250, 0)),
        "wikiart/images/a.jpg": photo(data / "wikiart/images/a.jpg", (0, 0, 250)),
    }
    nfd = unicodedata.normalize("NFD", PLACEHOLDER)
    part1 = [  # Vista's columns: id, image, vi_conversations (from/value, <ảnh> for <image>)
        {"id": None, "image": "wikiart/images/a.jpg", "vi_conversations": gpt(f"{PLACEHOLDER} Kể về bức tranh.")},
        {"id": "s1", "image": "coco/train2017/000000000009.jpg", "vi_conversations": gpt(f"{PLACEHOLDER}\nMô tả ảnh.")},
        {"id": "s2", "image": "sam/images/sa_1.jpg", "vi_conversations": gpt(f"Mô tả ảnh này.\n{nfd}")},
    ]
    part2 = [
        {"id": None, "image": "coco/train2017/000000000009.jpg", "vi_conversations": gpt("<Ảnh>\nẢnh có gì?")},
        {"id": "s5", "image": "sam/images/sa_404.jpg", "vi_conversations": gpt(f"{PLACEHOLDER}\nMô tả.")},
        {"id": "s6", "image": None, "vi_conversations": gpt(f"{PLACEHOLDER}\nMô tả.")},
    ]
    folder = tmp_path / "vi_sharegpt4v"
    write_parts(folder, {"train-00001-of-00002.parquet": part2, "train-00000-of-00002.parquet": part1})
    out = tmp_path / "out"
    m = run(folder, data, out, fmt="vista", subset="vi_sharegpt4v")
    assert [(p["path"].rsplit("/", 1)[1], p["records"]) for p in m["parts"]] == [
        ("train-00000-of-00002.parquet", 3),
        ("train-00001-of-00002.parquet", 3),
    ]
    assert (m["records_in"], m["records_out"], m["rejected"]) == (6, 4, {"missing_image": 2})
    assert (m["records_with_image"], m["records_text_only"], m["stage"], m["warnings"]) == (4, 0, "align", [])
    kept = shard_rows(out, m)
    # Rows without an id are told apart by their part.
    assert set(kept) == {"s1", "s2", "train-00000-of-00002.parquet:row-0", "train-00001-of-00002.parquet:row-0"}
    for row in kept.values():
        assert row["image"] == images[row["image_name"]]
        assert_one_image_first(row["messages"])
    assert kept["s2"]["messages"][0]["content"] == "<image>\nMô tả ảnh này."
    assert set(rejected(out)) == {"s5", "s6"}


def test_vi_wit_images_come_from_the_id_and_a_glob_picks_the_split(tmp_path):
    root = tmp_path / "vista-images"  # holds wit/images/<id>.jpg
    colours = {"Q1": (255, 0, 0), "Q2": (0, 255, 0), "Q3": (0, 0, 255)}
    image_bytes = {rid: photo(root / "wit" / "images" / f"{rid}.jpg", c) for rid, c in colours.items()}
    folder = tmp_path / "vi_wit"
    rows = [{"id": rid, "conversation": chat("Đây là gì?", second=False)} for rid in ("Q1", "Q2", "Q3", "Q4")]
    write_parts(
        folder,
        {  # Vista's columns: id and conversation only
            "train-00000-of-00002.parquet": rows[:2],
            "train-00001-of-00002.parquet": rows[2:],
            "validation-00000-of-00001.parquet": [{"id": "V1", "conversation": chat("?", second=False)}],
        },
    )
    out = tmp_path / "out"
    m = run(str(folder / "train-*.parquet"), root, out, fmt="vista", subset="vi_wit")
    assert len(m["parts"]) == 2 and m["image_pattern"] == "wit/images/{id}.jpg"
    assert (m["records_in"], m["records_out"], m["rejected"]) == (4, 3, {"missing_image": 1})
    assert (m["records_with_image"], m["records_text_only"]) == (3, 0)
    kept = shard_rows(out, m)
    for rid, row in kept.items():
        assert row["image"] == image_bytes[rid] and row["image_name"] == f"wit/images/{rid}.jpg"
        assert_one_image_first(row["messages"])
    assert rejected(out)["Q4"]["reason"] == "missing_image"
    # The directory itself holds two splits: reading it whole would train on validation.
    with pytest.raises(SourceError, match=r"several splits \(train, validation\)"):
        run(folder, root, tmp_path / "out2", fmt="vista", subset="vi_wit")


def test_vista_rows_without_their_image_are_never_kept_as_text(tmp_path):
    """vi_wit rows read without the subset's pattern name no image: rejected, not trained on as text."""
    src = tmp_path / "wit.parquet"
    write_parts(tmp_path, {"wit.parquet": [{"id": f"Q{i}", "conversation": chat("Gì?")} for i in range(3)]})
    m = run(src, tmp_path, tmp_path / "out", fmt="vista")
    assert (m["records_in"], m["records_out"], m["rejected"]) == (3, 0, {"missing_image": 3})
    assert "missing image" in m["warnings"][0]
    assert "(row has: id, conversation)" in rejected(tmp_path / "out")["Q0"]["detail"]


def test_llava_pretrain_558k_json(tmp_path):
    root = tmp_path / "images"
    img = photo(root / "00453" / "004539375.jpg", (90, 90, 90))
    rows = [  # LLaVA-Pretrain blip_laion_cc_sbu_558k.json
        {"id": "004539375", "image": "00453/004539375.jpg", "conversations": gpt("<image>\nMô tả ngắn gọn.", "Ghế.")},
        {"id": "004539376", "image": "", "conversations": gpt("<image>\nMô tả ngắn gọn.", "Bàn.")},
        {"id": "text", "conversations": gpt("Xin chào", "Chào bạn.")},
    ]
    (tmp_path / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(rows, ensure_ascii=False))
    out = tmp_path / "out"
    m = run(tmp_path / "blip_laion_cc_sbu_558k.json", root, out, fmt="llava", stage="align")
    assert (m["records_in"], m["records_out"], m["rejected"]) == (3, 2, {"missing_image": 1})
    assert (m["records_with_image"], m["records_text_only"]) == (1, 1)
    assert m["warnings"] == ["1 of 2 records of this align corpus have no image"]
    kept = shard_rows(out, m)
    assert kept["004539375"]["image"] == img and kept["text"]["image"] is None
    assert_one_image_first(kept["004539375"]["messages"])
    assert rejected(out)["004539376"]["reason"] == "missing_image"


def test_image_pattern_flag_names_the_columns_it_needs(tmp_path):
    root = tmp_path / "imgs"
    img = photo(root / "7.jpg", (1, 2, 3))
    lines = [
        {"id": "a", "image_id": 7, "conversation": json.dumps(chat("Gì?"), ensure_ascii=False)},  # JSON string
        {"id": "b", "conversation": chat("Gì?")},
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    out = tmp_path / "out"
    m = run(src, root, out, fmt="llava", image_pattern="{image_id}.jpg")
    assert (m["records_in"], m["records_out"], m["rejected"]) == (2, 1, {"missing_image": 1})
    assert shard_rows(out, m)["a"]["image"] == img
    assert "'image_id'" in rejected(out)["b"]["detail"]
    with pytest.raises(SourceError, match="column 'nope' is in no row of the input"):
        run(src, root, tmp_path / "out2", fmt="llava", image_pattern="{nope}.jpg")
    # A flag overrides the subset's preset.
    assert get_layout("vista", "vi_wit", image_column="path").image_columns == ("path",)
    assert get_layout("vista", "vi_wit", image_column="path").image_pattern is None
    assert get_layout("vista", "vi_llava_conversation", conversation_column="c").conversation_columns == ("c",)
    for kw, message in [
        ({"fmt": "llava", "subset": "vi_wit"}, "needs --format vista"),
        ({"fmt": "vista", "subset": "vi_nope"}, "unknown Vista subset"),
        ({"fmt": "vista", "image_pattern": "{}.jpg"}, "plain columns"),
        ({"fmt": "vista", "image_pattern": "{id.x}.jpg"}, "plain columns"),
    ]:
        with pytest.raises(SourceError, match=message):
            get_layout(**kw)


def test_conversations_from_numpy_arrays_and_pyarrow_lists():
    layout = get_layout("vista", "vi_llava_conversation")
    turns = chat("Gì?")
    for value in (np.array(turns, dtype=object), pa.scalar(turns), json.dumps(turns)):
        record = sources._conversation_record(
            {"id": "x", "file_name": "x.jpg", "conversation": value}, "x", layout, None
        )
        assert record["turns"] == turns and record["image"] == "x.jpg"


def test_s3_glob_input(tmp_path, monkeypatch):
    """s3:// parts (Parquet and JSON lines) through the same code, on a local stand-in for the bucket."""
    monkeypatch.setattr(
        storage, "_s3_filesystem", lambda _: pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    )
    root = tmp_path / "bucket" / "coco"
    img = photo(root / "1.jpg", (5, 5, 5))
    rows = [{"id": "p", "file_name": "1.jpg", "conversation": chat("Gì?")}]
    write_parts(tmp_path / "bucket" / "vista" / "a", {"train-0.parquet": rows})
    jsonl = tmp_path / "bucket" / "vista" / "b" / "train-1.jsonl"
    jsonl.parent.mkdir(parents=True)
    jsonl.write_text(json.dumps({**rows[0], "id": "j"}) + "\n")
    (tmp_path / "bucket" / "vista" / "b" / "notes.txt").write_text("not data")
    parts = sources.list_parts("s3://bucket/vista/**/train-*")
    assert parts == ["s3://bucket/vista/a/train-0.parquet", "s3://bucket/vista/b/train-1.jsonl"]
    assert sources.list_parts("s3://bucket/vista/b") == ["s3://bucket/vista/b/train-1.jsonl"]
    out = tmp_path / "out"
    m = run("s3://bucket/vista/**/train-*", "s3://bucket/coco", out, fmt="vista", subset="vi_llava_conversation")
    assert (m["records_in"], m["records_out"], m["records_with_image"]) == (2, 2, 2)
    assert [r["image"] for r in shard_rows(out, m).values()] == [img, img]
    with pytest.raises(FileNotFoundError, match="no .parquet/.json/.jsonl/.ndjson file matches"):
        sources.list_parts("s3://bucket/vista/*.parquet")


def test_cli_prepare_vista_subset(tmp_path, capsys):
    root = tmp_path / "images"
    photo(root / "wit" / "images" / "Q1.jpg", (9, 9, 9))
    write_parts(tmp_path / "vi_wit", {"train-00000-of-00001.parquet": [{"id": "Q1", "conversation": chat("Gì?")}]})
    args = ["prepare", "--format", "vista", "--subset", "vi_wit", "--input", str(tmp_path / "vi_wit")]
    args += ["--image-root", str(root), "--serial"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["records_out"] == summary["records_with_image"] == summary["parts"] == 1
    assert main([*args, "--out", str(tmp_path / "out2"), "--image-pattern", "{nope}.jpg"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --image-pattern '{nope}.jpg': column 'nope' is in no row of the input (its rows have: id, conversation)"
    )
