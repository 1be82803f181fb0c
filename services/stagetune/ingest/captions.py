"""Caption strategies, as SimpleTuner's `PromptHandler` (helpers/prompts.py) applies them.

- `filename`: the file's stem with underscores turned into spaces (`prepare_instance_prompt_from_filename`;
  nothing else is stripped, so `a_cat_01.png` gives "a cat 01").
- `textfile`: `<stem>.txt` beside the image; when it contains a newline it is split into one caption per
  line and empty lines dropped (`prepare_instance_prompt_from_textfile`), unless `disable_multiline_split`.
  We also strip surrounding whitespace of each caption (SimpleTuner keeps `\\r` of CRLF files and trailing
  blanks, which only make distinct text-cache entries for the same caption).
- `instanceprompt`: the dataset's `instance_prompt` (a string, or a list of strings) for every image.
- `parquet`: the image's row of the dataset's caption table (`caption_sources.py`); a file with no row, or
  a row with no caption, is filtered out and reported (SimpleTuner raises `CaptionNotFoundError`).
- `only_instance_prompt` replaces any caption with the instance prompt; `prepend_instance_prompt` puts
  `instance_prompt + " "` before each caption.
- The default text_embeds entry's `caption_filter_list` is applied last, to the prepended caption, as
  SimpleTuner filters the prompt it is about to encode.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from stagetune.core.config.dataset import DatasetConfig
from stagetune.core.errors import StagetuneError
from stagetune.core.manifest import canonical_json
from stagetune.ingest.caption_sources import CaptionFilter, CaptionTable


@dataclass(frozen=True)
class CaptionResult:
    captions: list[str]
    #: Bytes that decided the captions (the textfile's content), for the manifest's content hash.
    source_bytes: bytes = b""
    #: Why the image has no usable caption (the sample is filtered out and reported), or None.
    problem: str | None = None


def caption_file_for(image_path: Path) -> Path:
    """`os.path.splitext(path)[0] + ".txt"`, as SimpleTuner."""
    return image_path.with_suffix(".txt")


def _split_textfile(text: str, disable_multiline_split: bool) -> list[str]:
    if not disable_multiline_split and "\n" in text:
        parts = text.split("\n")
    else:
        parts = [text]
    return [part.strip() for part in parts if part.strip()]


def resolve_captions(
    config: DatasetConfig,
    image_path: Path | str,
    *,
    relative_path: str | None = None,
    table: CaptionTable | None = None,
    filters: CaptionFilter | None = None,
    read_sibling: Callable[[str], bytes | None] | None = None,
) -> CaptionResult:
    """The captions of one image; `relative_path` and `table` are needed for `caption_strategy: parquet`.

    `read_sibling(suffix)` reads the file beside the image (None when absent) wherever the dataset lives;
    without it the image is a local path.
    """
    result = _resolve(config, image_path, relative_path=relative_path, table=table, read_sibling=read_sibling)
    if result.problem or not filters:
        return result
    filtered = filters.apply_all(result.captions)
    if not filtered:
        return CaptionResult(
            captions=[],
            source_bytes=result.source_bytes,
            problem=f"caption empty after caption_filter_list: {result.captions!r}",
        )
    return CaptionResult(captions=filtered, source_bytes=result.source_bytes)


def _resolve(
    config: DatasetConfig,
    image_path: Path | str,
    *,
    relative_path: str | None,
    table: CaptionTable | None,
    read_sibling: Callable[[str], bytes | None] | None = None,
) -> CaptionResult:
    image = str(image_path)
    prompts = config.instance_prompts
    if config.only_instance_prompt or config.caption_strategy == "instanceprompt":
        return CaptionResult(captions=list(prompts))
    if config.caption_strategy == "parquet":
        if table is None:
            raise ValueError("caption_strategy=parquet needs the dataset's caption table")
        relative = relative_path if relative_path is not None else posixpath.basename(image)
        entry = table.lookup(relative)
        if entry is None:
            tried = " or ".join(repr(i) for i in table.identifiers_for(relative))
            return CaptionResult(captions=[], problem=f"no row for {tried} in {table.describe()}")
        source = canonical_json([entry.identifier, entry.captions])
        if not entry.captions:
            return CaptionResult(
                captions=[], source_bytes=source, problem=f"no caption for {entry.identifier!r} in {table.describe()}"
            )
        captions = list(entry.captions)
    elif config.caption_strategy == "filename":
        captions = [PurePosixPath(image).stem.replace("_", " ")]
        source = b""
    elif config.caption_strategy == "textfile":
        caption_name = posixpath.splitext(posixpath.basename(image))[0] + ".txt"
        try:
            found = caption_file_for(Path(image)).read_bytes() if read_sibling is None else read_sibling(".txt")
        except FileNotFoundError:
            found = None
        except (OSError, StagetuneError) as exc:
            return CaptionResult(captions=[], problem=f"caption file unreadable: {caption_name}: {exc}")
        if found is None:
            return CaptionResult(captions=[], problem=f"caption file missing: {caption_name}")
        source = found
        try:
            text = source.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            return CaptionResult(
                captions=[],
                source_bytes=source,
                problem=f"caption file is not UTF-8: {caption_name}: {exc}",
            )
        captions = _split_textfile(text, config.disable_multiline_split)
        if not captions:
            return CaptionResult(
                captions=[], source_bytes=source, problem=f"caption file empty: {caption_name}"
            )
    else:  # load_data_backend_config rejects every other strategy
        raise ValueError(f"unsupported caption_strategy {config.caption_strategy!r}")
    if config.prepend_instance_prompt and prompts:
        captions = [f"{prompts[0]} {caption}" for caption in captions]
    return CaptionResult(captions=captions, source_bytes=source)


__all__ = ["CaptionResult", "caption_file_for", "resolve_captions"]
