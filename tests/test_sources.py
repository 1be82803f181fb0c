"""Dataset sources on a local folder and on a real S3 server (SeaweedFS): listing, reads, captions, errors."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fixtures_store import S3Server, fresh_bucket
from PIL import Image

from stagetune.core.errors import ConfigError, InputError, NotFoundError, NotSupportedError, StoreUnavailableError
from stagetune.core.imaging import read_image_size
from stagetune.core.sources import LocalSource, S3Source, Source, SourceFile, read_many, source_for

SECRET = "sEcReT-do-not-print-4711"


def png_bytes(width: int = 4, height: int = 3, colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def count_requests(source: S3Source) -> Iterator[list[tuple[str, str]]]:
    """Every HTTP request the source's client sends, as (method, url), counted at the connection pool."""
    http = source.store._client._http
    calls: list[tuple[str, str]] = []
    original = http.urlopen

    def urlopen(method: str, url: str, *args: object, **kwargs: object) -> object:
        calls.append((method, url))
        return original(method, url, *args, **kwargs)

    http.urlopen = urlopen
    try:
        yield calls
    finally:
        del http.urlopen


def aws_entry(server: S3Server, bucket: str, prefix: str, **extra: object) -> dict[str, object]:
    """A multidatabackend.json entry as SimpleTuner users write it (endpoint with a trailing slash)."""
    return {
        "id": "photos",
        "type": "aws",
        "aws_bucket_name": bucket,
        "aws_data_prefix": prefix,
        "aws_endpoint_url": server.endpoint + "/",
        "aws_region_name": server.region,
        "aws_access_key_id": server.access_key,
        "aws_secret_access_key": server.secret_key,
        **extra,
    }


# -- local ---------------------------------------------------------------------------------------------


@pytest.fixture
def local_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.png").write_bytes(png_bytes(8, 6))
    (root / "b.txt").write_text("a red square\n", encoding="utf-8")
    (root / "a.JPG").write_bytes(png_bytes())  # extension rule is case-insensitive
    (root / "sub" / "c.webp").write_bytes(png_bytes())
    (root / "sub" / "deeper" / "d.png").write_bytes(png_bytes())
    (root / "notes.md").write_text("not an image")
    (root / ".x.png").write_bytes(png_bytes())
    (root / ".hidden" / "e.png").write_bytes(png_bytes())
    return root


def test_local_listing_is_images_only_recursive_and_sorted(local_dataset: Path) -> None:
    source = source_for({"id": "ds", "type": "local", "instance_data_dir": str(local_dataset)})
    assert isinstance(source, LocalSource) and isinstance(source, Source)
    files = source.list_files()
    assert [f.relative for f in files] == ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.png"]
    b = files[1]
    stat = (local_dataset / "b.png").stat()
    assert b == SourceFile(str(local_dataset / "b.png"), "b.png", stat.st_size, stat.st_mtime_ns, None)
    assert source.url == str(local_dataset)


def test_local_reads_captions_and_errors(local_dataset: Path) -> None:
    source = LocalSource(local_dataset, dataset_id="ds")
    image = str(local_dataset / "b.png")
    assert read_image_size(source.read(image)) == (8, 6)
    assert source.read("b.png") == source.read(image)  # relative to the root works too
    assert source.sibling(image, ".txt") == str(local_dataset / "b.txt")
    assert source.read_text(source.sibling(image, ".txt")) == "a red square\n"
    assert source.read_text(source.sibling(str(local_dataset / "a.JPG"), ".txt")) is None
    with pytest.raises(NotFoundError, match=r"'ds'.*nope\.png"):
        source.read(str(local_dataset / "nope.png"))
    (local_dataset / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match=r"bad\.txt.*not UTF-8"):
        source.read_text(str(local_dataset / "bad.txt"))


def test_local_missing_folder_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a folder"):
        source_for({"type": "local", "instance_data_dir": str(tmp_path / "absent")}).list_files()
    with pytest.raises(NotSupportedError, match="'csv'"):
        source_for({"id": "x", "type": "csv", "instance_data_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="instance_data_dir"):
        source_for({"id": "x", "type": "local"})


def test_source_for_reads_dataset_like_objects(local_dataset: Path) -> None:
    @dataclass
    class DatasetLike:  # DatasetConfig has no aws_* attributes yet: they are read with getattr
        id: str
        instance_data_dir: Path
        type: str = "local"

    source = source_for(DatasetLike("ds", local_dataset))
    assert isinstance(source, LocalSource) and len(source.list_files()) == 4


def test_read_many_keeps_order_and_reports_errors_in_place(local_dataset: Path) -> None:
    source = LocalSource(local_dataset)
    paths = [f.path for f in source.list_files()]
    wanted = paths[:2] + [str(local_dataset / "missing.png")] + paths[2:]
    for workers in (1, 3):
        results = list(read_many(source, wanted, max_workers=workers))
        assert [p for p, _ in results] == wanted
        assert isinstance(results[2][1], NotFoundError)
        assert all(isinstance(r, bytes) for i, (_, r) in enumerate(results) if i != 2)
    # stopping early does not hang or read the rest
    first = next(iter(source.read_many(wanted, max_workers=2)))
    assert first[0] == wanted[0]


# -- S3 ------------------------------------------------------------------------------------------------

N_IMAGES = 1060
N_CAPTIONS = 40


@dataclass(frozen=True)
class Bucket:
    name: str
    prefix: str
    images: list[str]  # relative keys under the prefix
    captions: set[str]  # relative keys of the .txt files
    png: bytes


@pytest.fixture(scope="module")
def s3_dataset(s3_server: S3Server) -> Bucket:
    """1,100 tiny objects under `data/` (more than one listing page) plus decoys beside the prefix."""
    client = s3_server.client()
    bucket = fresh_bucket()
    client.make_bucket(bucket)
    png = png_bytes(5, 7)
    images = [f"{'sub/' if i % 3 == 0 else ''}img_{i:05d}.png" for i in range(N_IMAGES)]
    captions = {f"img_{i:05d}.txt" for i in range(1, 3 * N_CAPTIONS, 3)}  # beside images not in sub/
    objects: dict[str, bytes] = {f"data/{k}": png for k in images}
    objects.update({f"data/{k}": f"caption of {k}".encode() for k in captions})
    objects["data/.hidden.png"] = png
    objects["data/readme.md"] = b"not an image"
    objects["data2/decoy.png"] = png  # shares the string prefix "data"
    objects["other/decoy.png"] = png
    objects["decoy.png"] = png

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(bucket, item[0], io.BytesIO(item[1]), len(item[1]))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, objects.items()))
    return Bucket(bucket, "data/", sorted(images), captions, png)


@pytest.fixture
def s3_source(s3_server: S3Server, s3_dataset: Bucket) -> Iterator[S3Source]:
    source = source_for(aws_entry(s3_server, s3_dataset.name, "data"))
    assert isinstance(source, S3Source)
    yield source
    source.close()


def test_s3_listing_pages_by_prefix_without_head_requests(s3_source: S3Source, s3_dataset: Bucket) -> None:
    started = time.perf_counter()
    with count_requests(s3_source) as calls:
        files = s3_source.list_files()
    seconds = time.perf_counter() - started
    assert [f.relative for f in files] == s3_dataset.images
    assert all(f.path == f"s3://{s3_dataset.name}/data/{f.relative}" for f in files)
    assert all(f.size == len(s3_dataset.png) and f.etag and f.mtime_ns > 1_600_000_000 * 10**9 for f in files)
    # 1,100+ keys under the prefix: two ListObjectsV2 pages, every one bounded by the prefix, no HEAD, no GET.
    methods = [m for m, _ in calls]
    assert methods == ["GET", "GET"], calls
    for _, url in calls:
        query = parse_qs(urlsplit(url).query)
        assert query["list-type"] == ["2"] and query["prefix"] == ["data/"], url
    print(f"listed {len(files)} images ({N_IMAGES + N_CAPTIONS + 2} keys) in {len(calls)} requests, {seconds:.3f}s")


def test_s3_prefix_without_slash_is_a_folder(s3_server: S3Server, s3_dataset: Bucket) -> None:
    for prefix in ("data", "/data/", "data/"):
        source = source_for(aws_entry(s3_server, s3_dataset.name, prefix))
        relatives = [f.relative for f in source.list_files()]
        assert len(relatives) == N_IMAGES and not any("decoy" in r for r in relatives)
    whole = source_for(aws_entry(s3_server, s3_dataset.name, ""))
    relatives = {f.relative for f in whole.list_files()}
    assert {"data2/decoy.png", "other/decoy.png", "decoy.png"} <= relatives
    assert "data/.hidden.png" not in relatives


def test_s3_captions_come_from_the_listing(s3_source: S3Source, s3_dataset: Bucket) -> None:
    files = s3_source.list_files()
    with count_requests(s3_source) as calls:
        texts = {f.relative: s3_source.read_text(s3_source.sibling(f.path, ".txt")) for f in files}
    found = {rel for rel, text in texts.items() if text is not None}
    assert {r.replace(".png", ".txt") for r in found} == s3_dataset.captions
    assert texts["img_00001.png"] == "caption of img_00001.txt"
    # one GET per caption that exists; none for the ~1,000 images without one
    assert len(calls) == N_CAPTIONS and {m for m, _ in calls} == {"GET"}
    assert s3_source.sibling("img_00001.png", ".txt") == f"s3://{s3_dataset.name}/data/img_00001.txt"


def test_s3_reads_in_parallel_in_order(s3_source: S3Source, s3_dataset: Bucket) -> None:
    files = s3_source.list_files()[:200]
    paths = [f.path for f in files]
    paths.insert(5, f"s3://{s3_dataset.name}/data/missing.png")
    started = time.perf_counter()
    results = list(s3_source.read_many(paths, max_workers=8))
    seconds = time.perf_counter() - started
    assert [p for p, _ in results] == paths
    assert isinstance(results[5][1], NotFoundError)
    assert "data/missing.png" in str(results[5][1]) and "'photos'" in str(results[5][1])
    good = [r for i, (_, r) in enumerate(results) if i != 5]
    assert all(r == s3_dataset.png for r in good)
    assert read_image_size(good[0]) == (5, 7)
    print(f"read {len(good)} objects with 8 threads in {seconds:.3f}s")


def test_s3_pool_is_sized_from_the_dataset(s3_server: S3Server, s3_dataset: Bucket) -> None:
    default = source_for(aws_entry(s3_server, s3_dataset.name, "data"))
    sized = source_for(aws_entry(s3_server, s3_dataset.name, "data", aws_max_pool_connections=64))
    assert default.store._client._http.connection_pool_kw["maxsize"] == 32
    assert sized.store._client._http.connection_pool_kw["maxsize"] == 64
    with pytest.raises(ConfigError, match="aws_max_pool_connections"):
        source_for(aws_entry(s3_server, s3_dataset.name, "data", aws_max_pool_connections="many"))


def test_s3_missing_object_and_bucket_are_not_found(s3_server: S3Server, s3_source: S3Source) -> None:
    with pytest.raises(NotFoundError, match=r"data/nope\.png"):
        s3_source.read("nope.png")
    assert s3_source.read_text("nope.txt") is None
    with pytest.raises(InputError, match="not an object of bucket"):
        s3_source.read("s3://another-bucket/data/x.png")
    absent = source_for(aws_entry(s3_server, fresh_bucket(), "data"))
    with pytest.raises(NotFoundError, match=r"bucket 'st-[0-9a-f]+' does not exist") as info:
        absent.list_files()
    assert "'photos'" in str(info.value)


def test_s3_empty_prefix_of_existing_bucket_lists_nothing(s3_server: S3Server, s3_dataset: Bucket) -> None:
    assert source_for(aws_entry(s3_server, s3_dataset.name, "nothing-here")).list_files() == []


def test_s3_credentials_from_the_environment(
    s3_server: S3Server, s3_dataset: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = aws_entry(s3_server, s3_dataset.name, "data", aws_region_name=None)
    del entry["aws_access_key_id"], entry["aws_secret_access_key"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    source = source_for(entry)
    assert len(source.list_files()) == N_IMAGES
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        source_for(entry)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_endpoint_is_unavailable_quickly_and_secrets_never_show(
    s3_server: S3Server, s3_dataset: Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = _closed_port()
    entry = aws_entry(s3_server, "some-bucket", "data", aws_secret_access_key=SECRET)
    entry["aws_endpoint_url"] = f"http://127.0.0.1:{port}"
    source = source_for(entry)
    messages = [repr(source), source.url]
    started = time.perf_counter()
    with pytest.raises(StoreUnavailableError) as info:
        source.list_files()
    seconds = time.perf_counter() - started
    assert seconds < 8, seconds
    assert f"127.0.0.1:{port}" in str(info.value) and "'photos'" in str(info.value)
    messages.append(str(info.value))
    with pytest.raises(StoreUnavailableError) as info:
        source.read("x.png")
    messages.append(str(info.value))
    print(f"unreachable endpoint reported after {seconds:.2f}s")

    with pytest.raises(ConfigError) as half:
        source_for({**aws_entry(s3_server, "bucket", "x"), "aws_access_key_id": None, "aws_secret_access_key": SECRET})
    messages.append(str(half.value))
    with pytest.raises(ConfigError) as bad_url:
        source_for({**aws_entry(s3_server, "bucket", "x"), "aws_endpoint_url": f"http://key:{SECRET}@host/path"})
    messages.append(str(bad_url.value))
    messages.extend(r.getMessage() for r in caplog.records)
    assert not [m for m in messages if SECRET in m]


def test_config_errors_name_the_field(s3_server: S3Server) -> None:
    with pytest.raises(ConfigError, match="aws_bucket_name"):
        source_for({"id": "x", "type": "aws", "aws_data_prefix": "a"})
    with pytest.raises(ConfigError, match="aws_bucket_name"):
        source_for({"id": "x", "type": "aws", "aws_bucket_name": "Bad_Bucket!"})
    with pytest.raises(ConfigError, match="aws_endpoint_url"):
        source_for({"id": "x", "type": "aws", "aws_bucket_name": "bucket", "aws_endpoint_url": "ftp://h"})
    with pytest.raises(ConfigError, match="aws_data_prefix"):
        source_for({"id": "x", "type": "aws", "aws_bucket_name": "bucket", "aws_data_prefix": "a/../b"})
    aws = source_for({"id": "x", "type": "aws", "aws_bucket_name": "bucket", "aws_access_key_id": "k",
                      "aws_secret_access_key": "s"})
    assert aws.url == "s3://bucket/ (endpoint https://s3.amazonaws.com)"
