"""Caption sources through run_ingest: textfile, instanceprompt, parquet/JSONL tables, caption_filter_list."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from PIL import Image

from stagetune.core.config.dataset import load_data_backend_config
from stagetune.core.errors import ConfigError, InputError, NotSupportedError, PreconditionError
from stagetune.core.store.local import LocalStore
from stagetune.ingest import run_ingest
from stagetune.ingest.caption_sources import caption_filter, normalise_caption_cell

TEXT_EMBEDS = {"id": "text-embeds", "dataset_type": "text_embeds", "default": True}


def _image(path: Path, size: tuple[int, int] = (512, 512), colour: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, colour).save(path)
    return path


def _entry(**kwargs) -> dict:
    return {"id": "ds", "instance_data_dir": "data", "resolution": 512, "resolution_type": "pixel", **kwargs}


def _ingest(tmp_path: Path, *entries: dict, text_embeds: dict | None = None):
    backends = load_data_backend_config([*entries, text_embeds or TEXT_EMBEDS], base_dir=tmp_path)
    return run_ingest(backends, LocalStore(tmp_path / "store", fsync=False), train_batch_size=1)


def _captions(result) -> dict[str, list[str]]:
    return {Path(r.path).name: r.captions for r in result.samples}


# ---------------------------------------------------------------------------------------------------
# textfile / instanceprompt


def test_textfile_multiline_split_and_disable(tmp_path: Path) -> None:
    _image(tmp_path / "data/a.png", colour=1)
    (tmp_path / "data/a.txt").write_text("first caption\r\n\nsecond caption \n")
    _image(tmp_path / "data/b.png", colour=2)
    (tmp_path / "data/b.txt").write_text("only one")
    split = _captions(_ingest(tmp_path, _entry(caption_strategy="textfile")))
    assert split == {"a.png": ["first caption", "second caption"], "b.png": ["only one"]}
    whole = _captions(_ingest(tmp_path, _entry(caption_strategy="textfile", disable_multiline_split=True)))
    assert whole["a.png"] == ["first caption\r\n\nsecond caption"]


def test_instance_prompt_variants(tmp_path: Path) -> None:
    _image(tmp_path / "data/a_red_fox.png", colour=1)
    (tmp_path / "data/a_red_fox.txt").write_text("fox in snow\nfox at night")
    strategy = _captions(_ingest(tmp_path, _entry(caption_strategy="instanceprompt", instance_prompt="sks fox")))
    assert strategy == {"a_red_fox.png": ["sks fox"]}
    listed = _captions(_ingest(tmp_path, _entry(caption_strategy="instanceprompt", instance_prompt=["p1", "p2"])))
    assert listed == {"a_red_fox.png": ["p1", "p2"]}
    prepended = _captions(
        _ingest(tmp_path, _entry(caption_strategy="textfile", instance_prompt="sks", prepend_instance_prompt=True))
    )
    assert prepended == {"a_red_fox.png": ["sks fox in snow", "sks fox at night"]}
    filename = _captions(_ingest(tmp_path, _entry(instance_prompt="sks", prepend_instance_prompt=True)))
    assert filename == {"a_red_fox.png": ["sks a red fox"]}
    only_entry = _entry(caption_strategy="textfile", instance_prompt="sks", only_instance_prompt=True)
    only = _captions(_ingest(tmp_path, only_entry))
    assert only == {"a_red_fox.png": ["sks"]}
    with pytest.raises(ConfigError, match="only_instance_prompt requires a non-empty instance_prompt"):
        _ingest(tmp_path, _entry(only_instance_prompt=True))


# ---------------------------------------------------------------------------------------------------
# parquet / JSONL


def _table_dataset(tmp_path: Path) -> list[dict]:
    _image(tmp_path / "data/1.png", (768, 512), colour=1)
    _image(tmp_path / "data/2.jpg", (512, 512), colour=2)
    _image(tmp_path / "data/sub/3.png", (512, 768), colour=3)
    _image(tmp_path / "data/4.png", (512, 512), colour=4)  # no row
    _image(tmp_path / "data/5.png", (512, 512), colour=5)  # row without any caption
    return [
        {"id": 1, "caption": "a wide one", "tags": "wide", "width": 768, "height": 512},
        {"id": "2", "caption": "", "tags": "square, fallback", "width": "512", "height": [512]},
        {"id": "sub/3", "caption": ["tall", "  also tall  "], "tags": None, "width": 512, "height": 768},
        {"id": 5, "caption": None, "tags": None, "width": 512, "height": 512},
    ]


def _parquet_block(path: str, **extra) -> dict:
    return {
        "path": path,
        "filename_column": "id",
        "caption_column": "caption",
        "fallback_caption_column": "tags",
        "width_column": "width",
        "height_column": "height",
        **extra,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_captions_fallback_lists_and_missing_rows(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "meta.jsonl", _table_dataset(tmp_path))
    entry = _entry(caption_strategy="parquet", metadata_backend="parquet", parquet=_parquet_block("meta.jsonl"))
    result = _ingest(tmp_path, entry)
    assert _captions(result) == {
        "1.png": ["a wide one"],
        "2.jpg": ["square, fallback"],  # empty caption → fallback_caption_column
        "3.png": ["tall", "also tall"],  # a list cell gives several captions
    }
    reasons = {Path(f["path"]).name: f["reason"] for f in result.report["filtered"]}
    assert "no row for '4' in meta.jsonl" in reasons["4.png"]
    assert "no caption for '5'" in reasons["5.png"]
    sizes = {Path(r.path).name: tuple(r.original_size) for r in result.samples}
    assert sizes == {"1.png": (768, 512), "2.jpg": (512, 512), "3.png": (512, 768)}


def test_table_identifiers_with_extension_and_prepend(tmp_path: Path) -> None:
    _image(tmp_path / "data/cat.png")
    _write_jsonl(tmp_path / "meta.jsonl", [{"file": "cat.png", "text": "a cat", "w": 512, "h": 512}])
    block = {
        "path": "meta.jsonl",
        "filename_column": "file",
        "caption_column": "text",
        "identifier_includes_extension": True,
        "width_column": "w",
        "height_column": "h",
    }
    entry = _entry(
        caption_strategy="parquet",
        metadata_backend="parquet",
        parquet=block,
        instance_prompt="sks",
        prepend_instance_prompt=True,
    )
    assert _captions(_ingest(tmp_path, entry)) == {"cat.png": ["sks a cat"]}
    # without identifier_includes_extension the table's "cat.png" is looked up as "cat": still found
    assert _captions(_ingest(tmp_path, {**entry, "parquet": {**block, "identifier_includes_extension": False}})) == {
        "cat.png": ["sks a cat"]
    }


def test_table_sizes_must_match_the_files(tmp_path: Path) -> None:
    _image(tmp_path / "data/a.png", (640, 512))
    _write_jsonl(tmp_path / "meta.jsonl", [{"id": "a", "description": "x", "width": 512, "height": 512}])
    entry = _entry(caption_strategy="parquet", metadata_backend="parquet", parquet={"path": "meta.jsonl"})
    # SimpleTuner's defaults: id / description / width / height; the only file is filtered: nothing to train on
    with pytest.raises(InputError, match="says 512x512 for 'a' but the file is 640x512") as info:
        _ingest(tmp_path, entry)
    assert "dataset 'ds'" in str(info.value) and "a.png" in str(info.value)


def test_textfile_captions_with_parquet_sizes(tmp_path: Path) -> None:
    _image(tmp_path / "data/a.png", (512, 768))
    (tmp_path / "data/a.txt").write_text("from the text file")
    _write_jsonl(tmp_path / "meta.jsonl", [{"id": "a", "description": "ignored", "width": 512, "height": 768}])
    entry = _entry(caption_strategy="textfile", metadata_backend="parquet", parquet={"path": "meta.jsonl"})
    result = _ingest(tmp_path, entry)
    assert _captions(result) == {"a.png": ["from the text file"]}
    assert result.samples[0].bucket == "0.67"


def test_changed_table_changes_the_manifest(tmp_path: Path) -> None:
    _image(tmp_path / "data/a.png")
    table = tmp_path / "meta.jsonl"
    _write_jsonl(table, [{"id": "a", "description": "one", "width": 512, "height": 512}])
    entry = _entry(caption_strategy="parquet", metadata_backend="parquet", parquet={"path": "meta.jsonl"})
    first = _ingest(tmp_path, entry)
    _write_jsonl(table, [{"id": "a", "description": "two", "width": 512, "height": 512}])
    second = _ingest(tmp_path, entry)
    assert second.manifest_id != first.manifest_id and _captions(second) == {"a.png": ["two"]}


@pytest.mark.parametrize(
    ("changes", "error", "field"),
    [
        ({"caption_strategy": "parquet"}, ConfigError, "metadata_backend"),
        ({"caption_strategy": "parquet", "metadata_backend": "parquet"}, ConfigError, "parquet"),
        ({"caption_strategy": "parquet", "metadata_backend": "parquet", "parquet": {}}, ConfigError, "parquet"),
        (
            {"caption_strategy": "parquet", "metadata_backend": "parquet", "parquet": {"filename_column": "id"}},
            ConfigError,
            "parquet.path",
        ),
        (
            {"metadata_backend": "parquet", "parquet": {"path": "m.jsonl", "caption_colum": "x"}},
            ConfigError,
            "caption_colum",
        ),
        (
            {"metadata_backend": "parquet", "parquet": {"path": "m.jsonl", "bbox_column": "boxes"}},
            NotSupportedError,
            "bbox_column",
        ),
    ],
)
def test_parquet_config_errors(tmp_path: Path, changes: dict, error: type, field: str) -> None:
    with pytest.raises(error) as info:
        load_data_backend_config([_entry(**changes), TEXT_EMBEDS], base_dir=tmp_path)
    assert info.value.field == field


def test_table_errors_name_the_file_and_column(tmp_path: Path) -> None:
    _image(tmp_path / "data/a.png")
    entry = _entry(caption_strategy="parquet", metadata_backend="parquet", parquet={"path": "missing.jsonl"})
    with pytest.raises(ConfigError, match="parquet.path not found") as info:
        _ingest(tmp_path, entry)
    assert "'ds'" in str(info.value)
    _write_jsonl(tmp_path / "meta.jsonl", [{"name": "a", "description": "x", "width": 1, "height": 1}])
    with pytest.raises(ConfigError, match="no column 'id'") as info:
        _ingest(tmp_path, {**entry, "parquet": {"path": "meta.jsonl"}})
    assert info.value.field == "parquet.filename_column"


def test_parquet_without_pyarrow_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image(tmp_path / "data/a.png")
    (tmp_path / "meta.parquet").write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    entry = _entry(caption_strategy="parquet", metadata_backend="parquet", parquet={"path": "meta.parquet"})
    with pytest.raises(PreconditionError, match="needs the 'pyarrow' package") as info:
        _ingest(tmp_path, entry)
    assert info.value.field == "parquet.path"


def test_parquet_file_reads_like_jsonl(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _table_dataset(tmp_path)
    rows[1]["height"] = 512  # Parquet columns have one type
    rows[1]["width"] = 512
    rows[0]["id"] = "1"
    rows[3]["id"] = "5"
    for row in rows:
        caption = row["caption"]
        row["caption"] = caption if isinstance(caption, list) else [caption] if caption else []
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "meta.parquet")
    entry = _entry(caption_strategy="parquet", metadata_backend="parquet", parquet=_parquet_block("meta.parquet"))
    assert _captions(_ingest(tmp_path, entry)) == {
        "1.png": ["a wide one"],
        "2.jpg": ["square, fallback"],
        "3.png": ["tall", "also tall"],
    }


def test_normalise_caption_cell() -> None:
    assert normalise_caption_cell(None) == []
    assert normalise_caption_cell(float("nan")) == []
    assert normalise_caption_cell(b" bytes ") == ["bytes"]
    assert normalise_caption_cell({"a": "x", "b": ["y", ""]}) == ["x", "y"]
    assert normalise_caption_cell(42) == ["42"]


# ---------------------------------------------------------------------------------------------------
# caption_filter_list


def test_caption_filter_semantics() -> None:
    filters = caption_filter(["arafed ", "this .* has a", "^there is ", "s/cat/dog/", "s/big/small", "(unclosed"])
    assert filters.apply("arafed image of a cat") == "image of a dog"
    assert filters.apply("this photo has a big cat, cat") == " small dog, dog"
    assert filters.apply("there is a cat there is") == "a dog there is"
    assert filters.apply("a (unclosed bracket") == "a  bracket"  # invalid regex: removed as plain text only
    assert filters.invalid == ("(unclosed",)
    assert filters.apply_all(["arafed ", "arafed cat"]) == ["dog"]


def test_caption_filter_list_from_list_txt_and_json(tmp_path: Path) -> None:
    _image(tmp_path / "data/arafed_photo_of_a_cat.png")
    as_list = {**TEXT_EMBEDS, "caption_filter_list": ["arafed ", "s/cat/dog/"]}
    listed = _captions(_ingest(tmp_path, _entry(), text_embeds=as_list))
    assert listed == {"arafed_photo_of_a_cat.png": ["photo of a dog"]}
    (tmp_path / "filters.txt").write_text("arafed \r\nphoto of \n\ns/cat/cow/\n")
    as_txt = {**TEXT_EMBEDS, "caption_filter_list": "filters.txt"}
    assert _captions(_ingest(tmp_path, _entry(), text_embeds=as_txt)) == {"arafed_photo_of_a_cat.png": ["a cow"]}
    (tmp_path / "filters.json").write_text(json.dumps(["^arafed photo ", "s/a cat/the cat/"]))
    as_json = {**TEXT_EMBEDS, "caption_filter_list": "filters.json"}
    result = _ingest(tmp_path, _entry(), text_embeds=as_json)
    assert _captions(result) == {"arafed_photo_of_a_cat.png": ["of the cat"]}
    assert result.captions == ["of the cat"]


def test_caption_filter_list_empties_and_errors(tmp_path: Path) -> None:
    _image(tmp_path / "data/arafed.png")
    with pytest.raises(InputError, match="arafed.png: caption empty after caption_filter_list"):
        _ingest(tmp_path, _entry(), text_embeds={**TEXT_EMBEDS, "caption_filter_list": ["arafed"]})
    for value, match in (
        ("filters.csv", "must end in .txt or .json"),
        ("nothere.txt", "file not found"),
        ([1, 2], "list of strings"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_data_backend_config([_entry(), {**TEXT_EMBEDS, "caption_filter_list": value}], base_dir=tmp_path)
    with pytest.raises(ConfigError, match="belongs on the text_embeds entry") as info:
        load_data_backend_config([_entry(caption_filter_list=["x"]), TEXT_EMBEDS], base_dir=tmp_path)
    assert info.value.field == "caption_filter_list"


def test_changed_filter_list_changes_the_manifest(tmp_path: Path) -> None:
    _image(tmp_path / "data/a_cat.png")
    first = _ingest(tmp_path, _entry(), text_embeds={**TEXT_EMBEDS, "caption_filter_list": ["s/cat/dog/"]})
    second = _ingest(tmp_path, _entry(), text_embeds={**TEXT_EMBEDS, "caption_filter_list": ["s/cat/cow/"]})
    assert first.manifest_id != second.manifest_id
    assert (_captions(first), _captions(second)) == ({"a_cat.png": ["a dog"]}, {"a_cat.png": ["a cow"]})
