"""`prepare`: every bad-input kind is rejected with its reason and counted; odd images are converted."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vistralv_ray.config.schema import ModelConfig
from vistralv_ray.data.images import decode_to_pixels
from vistralv_ray.data.prepare import PrepareOptions, prepare
from vistralv_ray.errors import RecordError


def qa(question="Màu gì?\n<image>", answer="Màu đỏ."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def save(img: Image.Image, path, fmt="JPEG", **kw):
    img.save(path, format=fmt, **kw)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels and holds none (what a decompression bomb opens as)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture()
def messy_source(tmp_path):
    """A LLaVA JSON file with one record of each kind, good and bad, and its image folder."""
    root = tmp_path / "images"
    root.mkdir()
    red = Image.new("RGB", (40, 30), (220, 20, 20))
    save(red, root / "good.jpg")
    save(red.convert("L"), root / "gray.png", "PNG")
    rgba = Image.new("RGBA", (40, 30), (220, 20, 20, 255))
    save(rgba, root / "rgba.png", "PNG")
    save(red.convert("P", palette=Image.Palette.ADAPTIVE), root / "palette.gif", "GIF")
    save(red.convert("CMYK"), root / "cmyk.jpg")
    save(red.convert("CMYK"), root / "cmyk.tif", "TIFF")  # PNG holds no CMYK: re-encoded as RGB
    # EXIF orientation 6 (rotate 90 CW to display): stored 40x30, shown 30x40.
    exif = Image.Exif()
    exif[0x0112] = 6
    left_red = Image.new("RGB", (40, 30), (20, 20, 220))
    left_red.paste((220, 20, 20), (0, 0, 20, 30))
    save(left_red, root / "rotated.jpg", exif=exif.tobytes())
    (root / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    buf = io.BytesIO()
    save(red, buf)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    save(Image.new("RGB", (300, 300), (1, 2, 3)), root / "huge.png", "PNG")
    (root / "bomb.png").write_bytes(png_header(20_000, 20_000))  # PIL's own bomb limit, above any of ours
    (tmp_path / "outside.jpg").write_bytes((root / "good.jpg").read_bytes())

    records = [
        {"id": "good", "image": "good.jpg", "conversations": qa()},
        {"id": "text-only", "conversations": qa("Xin chào", "Chào bạn.")},
        {"id": "gray", "image": "gray.png", "conversations": qa()},
        {"id": "rgba", "image": "rgba.png", "conversations": qa()},
        {"id": "palette", "image": "palette.gif", "conversations": qa()},
        {"id": "cmyk", "image": "cmyk.jpg", "conversations": qa()},
        {"id": "cmyk-tiff", "image": "cmyk.tif", "conversations": qa()},
        {"id": "rotated", "image": "rotated.jpg", "conversations": qa()},
        {"id": "missing", "image": "nope.jpg", "conversations": qa()},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": qa()},
        {"id": "truncated", "image": "truncated.jpg", "conversations": qa()},
        {"id": "escape", "image": "../outside.jpg", "conversations": qa()},
        {"id": "absolute", "image": str(tmp_path / "outside.jpg"), "conversations": qa()},
        {"id": "bomb", "image": "bomb.png", "conversations": qa()},
        {"id": "no-answer", "image": "good.jpg", "conversations": qa()[:1]},
        {"id": "order", "image": "good.jpg", "conversations": list(reversed(qa()))},
        {"id": "two-tags", "image": "good.jpg", "conversations": qa("<image> và <image>")},
        {"id": "tag-in-answer", "image": "good.jpg", "conversations": qa("Màu gì?", "<image> Màu đỏ.")},
        {"id": "empty", "image": "good.jpg", "conversations": qa(answer="  ")},
        {"id": "long", "image": "good.jpg", "conversations": qa(answer="rất dài " * 80)},
        "not a record",
        {"id": "many-pixels", "image": "huge.png", "conversations": qa()},
        {"id": "long-message", "image": "good.jpg", "conversations": qa(answer="dài " * 501)},
        {"id": "long-record", "image": "good.jpg", "conversations": qa("Gì? " * 300, "Đỏ. " * 300) * 2},
    ]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(records, ensure_ascii=False))
    return src, root


EXPECTED_REJECTS = {
    "missing_image": 1,
    "unreadable_image": 2,
    "image_outside_root": 2,
    "decompression_bomb": 1,
    "too_many_pixels": 1,
    "no_assistant_turn": 1,
    "roles_out_of_order": 1,
    "too_many_image_tags": 1,
    "empty_text": 1,
    "too_long": 1,
    "text_too_long": 2,
    "malformed_record": 2,
}


def options(tmp_path, root, tiny_model_config: ModelConfig, **kw):
    return PrepareOptions(
        image_root=str(root),
        out=str(tmp_path / "shards"),
        shard_size=4,
        max_pixels=200 * 200,
        model=tiny_model_config,
        fmt="llava",
        max_message_chars=2000,
        max_record_chars=4000,
        **kw,
    )


def test_every_bad_kind_is_rejected_and_counted(tmp_path, messy_source, tiny_model_config, monkeypatch):
    import vistralv_ray.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "SHARD_ROW_GROUP_ROWS", 3)
    src, root = messy_source
    tiny_model_config.max_length = 120
    manifest = prepare(src, options(tmp_path, root, tiny_model_config), parallel=False, progress=False)
    assert manifest["records_in"] == 24
    assert manifest["rejected"] == EXPECTED_REJECTS
    assert manifest["records_out"] == 8
    rejected = [json.loads(line) for line in (tmp_path / "shards" / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == sum(EXPECTED_REJECTS.values())
    by_id = {r["id"]: r["reason"] for r in rejected}
    assert by_id["escape"] == by_id["absolute"] == "image_outside_root"
    assert (
        by_id["bomb"] == "decompression_bomb" and by_id["long"] == "too_long" and by_id["row-20"] == "malformed_record"
    )
    kept = [pq.read_table(tmp_path / "shards" / s["name"]) for s in manifest["shards"]]
    # Shards of 4 rows in row groups of at most 3: the actors can read a shard a row group at a time.
    groups = [pq.ParquetFile(tmp_path / "shards" / s["name"]).metadata for s in manifest["shards"]]
    assert [m.num_rows for m in groups] == [4, 4] and all(m.num_row_groups == 2 for m in groups)
    ids = sorted(i for t in kept for i in t.column("id").to_pylist())
    assert ids == sorted(["good", "text-only", "gray", "rgba", "palette", "cmyk", "cmyk-tiff", "rotated"])
    assert by_id["tag-in-answer"] == "malformed_record" and by_id["many-pixels"] == "too_many_pixels"
    assert by_id["long-message"] == by_id["long-record"] == "text_too_long"  # each message within the limit
    assert (manifest["max_image_pixels"], manifest["max_message_chars"], manifest["max_record_chars"]) == (
        40_000,
        2000,
        4000,
    )
    assert set(ids) | set(by_id) == {
        r.get("id", "row-20") if isinstance(r, dict) else "row-20" for r in json.loads(src.read_text())
    }


def test_prepare_keeps_a_record_of_exactly_max_length_and_rejects_one_token_more(tmp_path, tiny_model_config):
    """Counted with the image's tokens expanded: at max_length - 1 the record is rejected, though its
    text before expansion would fit many times over."""
    import dataclasses

    from vistralv_ray.text.conversation import normalize_messages
    from vistralv_ray.text.encoder import build_encoder

    root = tmp_path / "images"
    root.mkdir()
    save(Image.new("RGB", (24, 24), (220, 20, 20)), root / "red.jpg")
    (tmp_path / "src.json").write_text(json.dumps([{"id": "r", "image": "red.jpg", "conversations": qa()}]))
    encoder = build_encoder(tiny_model_config)
    length = encoder.encode(normalize_messages(qa(), has_image=True)).input_ids.size
    assert length - encoder.image_seq_length + 1 < length - 1 < length
    for max_length, kept in ((length, True), (length - 1, False)):
        out = tmp_path / f"shards-{max_length}"
        model = dataclasses.replace(tiny_model_config, max_length=max_length)
        opts = PrepareOptions(image_root=str(root), out=str(out), shard_size=4, model=model, fmt="llava")
        manifest = prepare(tmp_path / "src.json", opts, parallel=False, progress=False)
        assert manifest["max_length_checked"] == max_length
        assert (manifest["records_out"], manifest["rejected"]) == ((1, {}) if kept else (0, {"too_long": 1}))


def test_odd_images_are_converted_correctly(tmp_path, messy_source, tiny_model_config):
    src, root = messy_source
    manifest = prepare(src, options(tmp_path, root, tiny_model_config), parallel=False, progress=False)
    rows = {}
    for shard in manifest["shards"]:
        for row in pq.read_table(tmp_path / "shards" / shard["name"]).to_pylist():
            rows[row["id"]] = row
    assert rows["text-only"]["image"] is None
    assert Image.open(io.BytesIO(rows["palette"]["image"])).format == "PNG"  # GIF re-encoded
    assert Image.open(io.BytesIO(rows["cmyk-tiff"]["image"])).mode == "RGB"  # CMYK TIFF -> RGB PNG
    assert rows["good"]["image"] == (root / "good.jpg").read_bytes()  # JPEG kept byte for byte
    for rid in ("good", "rgba", "palette", "cmyk", "cmyk-tiff"):
        px = decode_to_pixels(rows[rid]["image"], 16, "resize").astype(int)
        assert px.shape == (16, 16, 3)
        assert abs(px[8, 8] - [220, 20, 20]).max() < 40, (rid, px[8, 8])
    gray = decode_to_pixels(rows["gray"]["image"], 16, "resize")
    assert gray.shape == (16, 16, 3) and gray[8, 8, 0] == gray[8, 8, 1] == gray[8, 8, 2]
    # Orientation applied: the red half that was on the left of the stored image is now on top.
    rot = decode_to_pixels(rows["rotated"]["image"], 16, "resize").astype(int)
    assert rot[2, 8, 0] > 150 and rot[13, 8, 2] > 150


def test_pad_keeps_aspect_with_grey_fill():
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (220, 20, 20)).save(buf, "PNG")
    px = decode_to_pixels(buf.getvalue(), 32, "pad")
    assert tuple(px[1, 16]) == (127, 127, 127) and tuple(px[16, 16]) == (220, 20, 20)
    px = decode_to_pixels(buf.getvalue(), 32, "resize")
    assert tuple(px[1, 16]) == (220, 20, 20)


def test_pad_matches_llava_pad_then_resize_up_to_the_edges():
    from vistralv_ray.bench.inputs import synthetic_photos
    from vistralv_ray.data.images import pad_to_square

    for photo in synthetic_photos(3, width=200, height=120, distinct=3):
        ours = decode_to_pixels(photo, 64, "pad").astype(int)
        full = pad_to_square(Image.open(io.BytesIO(photo)).convert("RGB"))
        llava = np.asarray(full.resize((64, 64), Image.Resampling.BICUBIC)).astype(int)
        assert ours.shape == llava.shape == (64, 64, 3)
        assert np.abs(ours - llava).mean() < 2.0  # JPEG draft decoding and the edge rows differ slightly
        assert (ours[:10] == 127).all() and (ours[-10:] == 127).all()  # 200x120 -> 64x38, bands of 13


def test_pad_follows_exif_orientation():
    img = Image.new("RGB", (60, 20), (20, 20, 220))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: 20 wide, 60 tall
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    px = decode_to_pixels(buf.getvalue(), 30, "pad").astype(int)
    assert (px[:, :5] == 127).all() and (px[:, -5:] == 127).all()  # padded left and right, not top
    assert px[15, 15, 2] > 180 and px[2, 15, 2] > 180


def test_strict_names_the_first_bad_record_and_leaves_no_shards(tmp_path, messy_source, tiny_model_config):
    src, root = messy_source
    with pytest.raises(RecordError, match="record 'missing': missing_image"):
        prepare(src, options(tmp_path, root, tiny_model_config, strict=True), parallel=False, progress=False)
    assert not list((tmp_path / "shards").glob("*.parquet"))


def test_existing_output_is_never_overwritten(tmp_path, messy_source, tiny_model_config):
    src, root = messy_source
    opts = options(tmp_path, root, tiny_model_config)
    prepare(src, opts, parallel=False, progress=False)
    with pytest.raises(FileExistsError, match="already holds prepared shards"):
        prepare(src, opts, parallel=False, progress=False)


def test_vista_and_caption_formats(tmp_path, tiny_model_config):
    import pyarrow as pa

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (20, 20), (0, 200, 0)).save(root / "a.jpg")
    vista = pa.Table.from_pylist(
        [
            {
                "id": "v1",
                "image": "a.jpg",
                "conversation": [{"role": "user", "content": "Màu gì?"}, {"role": "assistant", "content": "Xanh lá."}],
            },
            {"id": "v2", "image": "a.jpg", "conversation": [{"role": "user", "content": "Màu gì?"}]},
        ]
    )
    pq.write_table(vista, tmp_path / "vista.parquet")
    m = prepare(
        tmp_path / "vista.parquet",
        PrepareOptions(str(root), str(tmp_path / "v"), fmt="vista"),
        parallel=False,
        progress=False,
    )
    assert (m["records_out"], m["rejected"]) == (1, {"no_assistant_turn": 1})
    hf_rows = pa.Table.from_pylist(
        [
            {  # HF datasets' image column: the bytes travel in the row
                "id": "v3",
                "image": {"bytes": (root / "a.jpg").read_bytes(), "path": "coco/000.jpg"},
                "conversation": [{"role": "user", "content": "Màu gì?"}, {"role": "assistant", "content": "Xanh."}],
            },
            {
                "id": "v4",
                "image": {"bytes": None, "path": "a.jpg"},
                "conversation": [{"role": "user", "content": "Màu gì?"}, {"role": "assistant", "content": "Xanh."}],
            },
        ]
    )
    pq.write_table(hf_rows, tmp_path / "vista-hf.parquet")
    m = prepare(
        tmp_path / "vista-hf.parquet",
        PrepareOptions(str(root), str(tmp_path / "v-hf"), fmt="vista"),
        parallel=False,
        progress=False,
    )
    assert (m["records_out"], m["rejected"]) == (2, {})
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "v-hf" / "part-00000.parquet").to_pylist()}
    assert rows["v3"]["image"] == rows["v4"]["image"] == (root / "a.jpg").read_bytes()
    assert rows["v3"]["image_name"] == "coco/000.jpg" and rows["v4"]["image_name"] == "a.jpg"
    (tmp_path / "caps.jsonl").write_text(
        json.dumps({"image": "a.jpg", "caption": "Một bức ảnh màu xanh lá."}, ensure_ascii=False)
        + "\n{broken\n"
        + json.dumps({"id": "no-image", "caption": "Ảnh."})
        + "\n"
        + json.dumps({"id": "two-images", "image": ["a.jpg", "a.jpg"], "caption": "Ảnh."})
        + "\n"
    )
    m = prepare(
        tmp_path / "caps.jsonl",
        PrepareOptions(str(root), str(tmp_path / "c"), fmt="captions"),
        parallel=False,
        progress=False,
    )
    assert (m["records_out"], m["rejected"]) == (1, {"malformed_record": 2, "missing_image": 1})
    reasons = {r["id"]: r for r in map(json.loads, (tmp_path / "c" / "rejected.jsonl").read_text().splitlines())}
    assert reasons["no-image"]["reason"] == "missing_image" and "two-images" in reasons
    row = pq.read_table(tmp_path / "c" / "part-00000.parquet").to_pylist()[0]
    assert row["messages"][0]["content"].startswith("<image>\n")
    assert row["messages"][1] == {"role": "assistant", "content": "Một bức ảnh màu xanh lá."}


def test_packed_rows_hold_all_tokens():
    from vistralv_ray.data.packing import layout_batch, pack_sequences

    rows = pack_sequences([5, 9, 3, 7, 2], capacity=10)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 9, 3, 7, 2][i] for i in r) <= 10 for r in rows)
    ids = [np.arange(n) + 10 for n in (5, 3)]
    batch = layout_batch(ids, ids, [None, None], pad_id=0, mode="pack", pack_length=None, image_shape=(4, 4, 3))
    assert batch.input_ids.shape == (1, 8)
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    # The last token of each sample predicts nothing: no sample learns its neighbour's first token.
    assert batch.targets.tolist() == [[11, 12, 13, 14, -100, 11, 12, -100]]


def test_preprocessor_leaves_out_the_records_a_resumed_epoch_has_seen(tmp_path, tiny_model_config):
    import dataclasses

    from vistralv_ray.data.preprocess import Preprocessor, record_key, save_keys

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(buf, "JPEG")
    messages = [{"role": "user", "content": "<image>\nMàu gì?"}, {"role": "assistant", "content": "Màu xanh."}]
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "image": [buf.getvalue()] * 3, "messages": [messages] * 3}
    model_cfg = dataclasses.asdict(tiny_model_config)

    uri = str(tmp_path / "skip.npy")
    save_keys(uri, [record_key("a"), record_key("c")])
    out = Preprocessor(model_cfg, 10**8, skip_keys_uri=uri)(batch)
    assert list(out["id"]) == ["b"] and out["pixel_values"].shape[0] == len(out["input_ids"]) == 1

    save_keys(uri, [record_key(r) for r in "abc"])
    out = Preprocessor(model_cfg, 10**8, skip_keys_uri=uri)(batch)
    assert len(out["id"]) == 0 and out["pixel_values"].shape[0] == 0

    assert list(Preprocessor(model_cfg, 10**8)(batch)["id"]) == ["a", "b", "c"]
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        Preprocessor(model_cfg, 10**8, skip_keys_uri=str(tmp_path / "missing.npy"))


def test_shard_preprocessor_streams_a_shard_and_names_one_it_cannot_read(tmp_path, tiny_model_config):
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vistralv_ray.data.prepare import SHARD_SCHEMA
    from vistralv_ray.data.preprocess import ShardPreprocessor

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(buf, "JPEG")
    messages = [{"role": "user", "content": "<image>\nMàu gì?"}, {"role": "assistant", "content": "Màu xanh."}]
    rows = [{"id": f"r{i}", "image": buf.getvalue(), "messages": messages} for i in range(5)]
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file")

    pre = ShardPreprocessor(dataclasses.asdict(tiny_model_config), 10**8, rows_per_call=2)
    outs = list(pre({"uri": np.array([str(good)], dtype=object)}))
    assert [list(o["id"]) for o in outs] == [["r0", "r1"], ["r2", "r3"], ["r4"]]
    assert all(o["pixel_values"].dtype == np.uint8 and not any(o["reject_reason"]) for o in outs)
    with pytest.raises(OSError, match="bad.parquet: cannot read the shard"):
        list(pre({"uri": np.array([str(bad)], dtype=object)}))


def test_rows_sharing_an_id_have_their_own_resume_keys(tmp_path, tiny_model_config):
    """LLaVA's finetune JSON gives one image's conversations one id: each row is still its own record,
    and a resumed epoch leaves out exactly the rows it trained, not their id-sharing siblings."""
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vistralv_ray.data.prepare import SHARD_SCHEMA
    from vistralv_ray.data.preprocess import PackingCollate, ShardPreprocessor, save_keys
    from vistralv_ray.data.shards import row_key

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(buf, "JPEG")
    messages = [{"role": "user", "content": "<image>\nMàu gì?"}, {"role": "assistant", "content": "Màu xanh."}]
    rows = [{"id": f"img{i // 2}", "image": buf.getvalue(), "messages": messages} for i in range(6)]
    shard = str(tmp_path / "shard.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), shard)
    model_cfg = dataclasses.asdict(tiny_model_config)

    outs = list(ShardPreprocessor(model_cfg, 10**8, rows_per_call=4)({"uri": np.array([shard], dtype=object)}))
    keys = [int(k) for o in outs for k in o["key"]]
    assert keys == [row_key(shard, r) for r in range(6)] and len(set(keys)) == 6
    batch = PackingCollate(0, "pack", None)(outs[0])
    assert batch.sample_ids == ["img0", "img0", "img1", "img1"] and batch.sample_keys == keys[:4]

    skip = str(tmp_path / "skip.npy")
    save_keys(skip, [row_key(shard, 0), row_key(shard, 3)])  # one conversation of img0, one of img1
    pre = ShardPreprocessor(model_cfg, 10**8, rows_per_call=4, skip_keys_uri=skip)
    left = [(str(i), int(k)) for o in pre({"uri": np.array([shard], dtype=object)}) for i, k in zip(o["id"], o["key"])]
    assert left == [("img0", keys[1]), ("img1", keys[2]), ("img2", keys[4]), ("img2", keys[5])]


def test_prepare_reports_duplicate_ids_and_keeps_every_record(tmp_path):
    from vistralv_ray.data.prepare import PrepareOptions, prepare

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "a.jpg")
    records = [
        {"id": rid, "image": "a.jpg", "conversations": [{"from": "human", "value": f"<image>\nCâu {n}?"},
                                                          {"from": "gpt", "value": "Đỏ."}]}
        for n, rid in enumerate(["x", "x", "x", "y", "z", "z"])
    ]  # fmt: skip
    src = tmp_path / "dup.json"
    src.write_text(json.dumps(records, ensure_ascii=False))
    manifest = prepare(src, PrepareOptions(str(images), str(tmp_path / "out")), parallel=False, progress=False)
    assert manifest["records_out"] == 6
    assert manifest["duplicate_ids"] == {"ids": 2, "records": 5, "examples": ["x", "z"]}


def test_a_corrupt_image_inside_a_shard_is_a_counted_rejection_at_training_time(tmp_path, tiny_model_config):
    """Shards may come from elsewhere: an image that no longer decodes (bytes flipped, truncated) is the
    record's `unreadable_image` in the batch it would have joined, never a crashed preprocessing actor."""
    import dataclasses

    import pyarrow as pa

    from vistralv_ray.data.prepare import SHARD_SCHEMA
    from vistralv_ray.data.preprocess import PackingCollate, ShardPreprocessor

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(buf, "JPEG")
    good = buf.getvalue()
    messages = [{"role": "user", "content": "<image>\nMàu gì?"}, {"role": "assistant", "content": "Màu xanh."}]
    images = [good, b"not an image", good[: len(good) // 3], good]
    rows = [{"id": f"r{i}", "image": im, "messages": messages} for i, im in enumerate(images)]
    shard = tmp_path / "shard.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), shard)

    pre = ShardPreprocessor(dataclasses.asdict(tiny_model_config), 10**8, rows_per_call=8)
    (out,) = list(pre({"uri": np.array([str(shard)], dtype=object)}))
    batch = PackingCollate(0, "pack", None)(out)
    assert batch.sample_ids == ["r0", "r3"] and batch.pixel_values.shape[0] == 2
    assert [(rid, reason) for rid, reason, _ in batch.rejected] == [
        ("r1", "unreadable_image"),
        ("r2", "unreadable_image"),
    ]
