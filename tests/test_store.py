"""The store contract on a local folder and on a real S3 server, plus URL parsing."""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fixtures_store import S3Server, fresh_bucket

from stagetune.core.errors import ConfigError, InputError, NotFoundError, StoreUnavailableError
from stagetune.core.store import (
    InvalidKeyError,
    LocalStore,
    Store,
    check_key,
    default_store_url,
    open_store,
)
from stagetune.core.store.local import TMP_PREFIX
from stagetune.core.store.s3 import S3Store

# -- the contract, on both stores --------------------------------------------------------------------


def test_round_trip_and_overwrite(store: Store) -> None:
    store.put_bytes("a/b/c.bin", b"one")
    assert store.exists("a/b/c.bin")
    assert store.get_bytes("a/b/c.bin") == b"one"
    store.put_bytes("a/b/c.bin", b"two, longer")
    assert store.get_bytes("a/b/c.bin") == b"two, longer"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    assert store.exists("empty")


def test_binary_payload_round_trips_exactly(store: Store) -> None:
    data = os.urandom(100_000) + b"\x00\r\n\xff"
    store.put_bytes("bin/x", data)
    assert store.get_bytes("bin/x") == data


def test_missing_key_names_the_key(store: Store) -> None:
    assert not store.exists("nope/missing.json")
    with pytest.raises(NotFoundError, match=r"nope/missing\.json"):
        store.get_bytes("nope/missing.json")
    with pytest.raises(NotFoundError, match=r"nope/other"):
        store.get_file("nope/other", Path("/tmp/never-written"))
    assert not Path("/tmp/never-written").exists()


def test_list_is_recursive_sorted_and_bounded_by_prefix(store: Store) -> None:
    keys = ["x/b/2", "x/a", "x/b/1", "x/c/d/e", "xy/z", "y/1", "x2"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert list(store.list("x/")) == ["x/a", "x/b/1", "x/b/2", "x/c/d/e"]
    assert list(store.list("x/b/")) == ["x/b/1", "x/b/2"]
    # A prefix is a plain string prefix, as on S3, not a folder name.
    assert list(store.list("x")) == ["x/a", "x/b/1", "x/b/2", "x/c/d/e", "x2", "xy/z"]
    assert list(store.list("x/b/1")) == ["x/b/1"]
    assert list(store.list("nothing/")) == []
    assert list(store.list("")) == sorted(keys)


def test_delete_and_delete_prefix(store: Store) -> None:
    for key in ["d/1", "d/2/3", "d2", "e/1"]:
        store.put_bytes(key, b".")
    store.delete("d/1")
    store.delete("d/1")  # already gone: no error
    store.delete("never/was")
    assert not store.exists("d/1")
    assert list(store.list("d")) == ["d/2/3", "d2"]
    store.delete_prefix("d/")
    assert list(store.list("")) == ["d2", "e/1"]
    with pytest.raises(InvalidKeyError):
        store.delete_prefix("")  # would wipe everything


def test_put_file_and_get_file(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"file body" * 1000)
    store.put_file("files/one", src)
    assert store.get_bytes("files/one") == src.read_bytes()
    dst = tmp_path / "out" / "deep" / "dst.bin"
    store.get_file("files/one", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dst.bin"]  # no temp files left
    with pytest.raises(NotFoundError, match="nosuch"):
        store.put_file("files/two", tmp_path / "nosuch")


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "a/../b", "..", "a//b", "./a", "a/./b", "trailing/", "back\\slash", "nul\x00"],
)
def test_bad_keys_are_refused_everywhere(store: Store, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidKeyError):
        store.get_bytes(key)
    with pytest.raises(InvalidKeyError):
        store.exists(key)
    with pytest.raises(InvalidKeyError):
        store.delete(key)


def test_bad_prefixes_are_refused(store: Store) -> None:
    for prefix in ["../", "/x", "a/../", "a//"]:
        with pytest.raises(InvalidKeyError):
            list(store.list(prefix))


def test_concurrent_writers_of_one_key_leave_one_whole_value(store: Store) -> None:
    values = [bytes([i]) * 200_000 for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda v: store.put_bytes("race/key", v), values))
    assert store.get_bytes("race/key") in values
    assert list(store.list("race/")) == ["race/key"]


def test_multipart_upload_of_a_large_object(store: Store, tmp_path: Path) -> None:
    data = os.urandom(6 * 1024 * 1024 + 123)  # > 5 MiB: two parts on S3
    store.put_bytes("big/bytes", data)
    assert store.get_bytes("big/bytes") == data
    src = tmp_path / "big.bin"
    src.write_bytes(data[::-1])
    store.put_file("big/file", src)
    out = tmp_path / "back.bin"
    store.get_file("big/file", out)
    assert out.read_bytes() == data[::-1]
    if isinstance(store, S3Store):
        stat = store._client.stat_object(store.bucket, store.prefix + "big/bytes")
        assert stat.etag is not None and stat.etag.endswith("-2"), stat.etag  # multipart etag


# -- local store specifics ----------------------------------------------------------------------------


def test_local_failed_write_keeps_old_object_and_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("k/obj", b"old")

    def boom(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk on fire"):
        store.put_bytes("k/obj", b"new")
    monkeypatch.undo()
    assert store.get_bytes("k/obj") == b"old"
    assert os.listdir(tmp_path / "k") == ["obj"]


def test_local_temp_files_are_invisible_and_their_names_reserved(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("k/real", b"1")
    (tmp_path / "k" / f"{TMP_PREFIX}abandoned").write_bytes(b"half")  # a killed writer's leftover
    assert list(store.list("k/")) == ["k/real"]
    with pytest.raises(InvalidKeyError):
        store.put_bytes(f"k/{TMP_PREFIX}x", b"1")


def test_local_path_and_layout(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.put_bytes("a/b.txt", b"hi")
    path = store.local_path("a/b.txt")
    assert path == tmp_path / "root" / "a" / "b.txt"
    assert path.read_bytes() == b"hi"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # readable by other pods sharing the folder
    with pytest.raises(InvalidKeyError):
        store.local_path("../escape")


def test_local_key_that_is_also_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a/b", b"1")
    with pytest.raises(InputError, match="a/b/c"):
        store.put_bytes("a/b/c", b"2")
    store.put_bytes("x/y/z", b"3")
    with pytest.raises(InputError, match="folder"):
        store.put_bytes("x/y", b"4")
    assert not store.exists("x/y")
    with pytest.raises(NotFoundError):
        store.get_bytes("x/y")


def test_local_delete_prefix_removes_empty_folders(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("p/q/r", b"1")
    store.put_bytes("keep/me", b"1")
    store.delete_prefix("p/")
    assert sorted(os.listdir(tmp_path)) == ["keep"]
    store.put_bytes("p/q/r", b"again")  # and writing there again works
    assert store.get_bytes("p/q/r") == b"again"


# -- S3 specifics -------------------------------------------------------------------------------------


def test_s3_listing_paginates_past_1000_keys(s3_server: S3Server) -> None:
    store = open_store(s3_server.url(fresh_bucket(), prefix="root"))
    keys = [f"many/{i:05d}" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: store.put_bytes(k, b"."), keys))
    store.put_bytes("other/x", b".")
    assert list(store.list("many/")) == keys
    assert list(store.list("many/0105")) == [f"many/0105{i}" for i in range(10)]
    store.delete_prefix("many/")  # batched deletes
    assert list(store.list("")) == ["other/x"]


def test_s3_lists_by_prefix_never_the_whole_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(s3_server.url(fresh_bucket(), prefix="tenant/a"))
    assert isinstance(store, S3Store)
    store.put_bytes("cache/x/1", b".")
    calls: list[dict[str, object]] = []
    real = store._client.list_objects

    def spy(bucket: str, **kwargs: object):  # noqa: ANN202
        calls.append(kwargs)
        return real(bucket, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store._client, "list_objects", spy)
    assert list(store.list("cache/")) == ["cache/x/1"]
    assert calls[0]["prefix"] == "tenant/a/cache/"


def test_s3_store_prefix_isolates_tenants(s3_server: S3Server) -> None:
    bucket = fresh_bucket()
    one = open_store(s3_server.url(bucket, prefix="one"))
    two = open_store(s3_server.url(bucket, prefix="two"))
    one.put_bytes("k", b"1")
    two.put_bytes("k", b"2")
    assert one.get_bytes("k") == b"1" and two.get_bytes("k") == b"2"
    assert list(one.list("")) == ["k"]
    whole = open_store(s3_server.url(bucket))
    assert list(whole.list("")) == ["one/k", "two/k"]


def test_s3_bucket_is_created_unless_told_not_to(s3_server: S3Server) -> None:
    bucket = fresh_bucket()
    strict = open_store(s3_server.url(bucket, create_bucket="false"))
    assert list(strict.list("x/")) == []  # reading an absent bucket: simply empty
    with pytest.raises(NotFoundError, match=bucket):
        strict.put_bytes("k", b"1")
    creating = open_store(s3_server.url(bucket))
    creating.put_bytes("k", b"1")
    assert s3_server.client().bucket_exists(bucket)
    assert strict.get_bytes("k") == b"1"


def test_s3_two_stores_creating_one_bucket_at_once(s3_server: S3Server) -> None:
    bucket = fresh_bucket()
    stores = [open_store(s3_server.url(bucket)) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: s[1].put_bytes(f"k{s[0]}", b"."), enumerate(stores)))
    assert list(stores[0].list("")) == ["k0", "k1", "k2", "k3"]


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_unreachable_endpoint_is_store_unavailable_naming_it_quickly() -> None:
    port = _closed_port()
    store = open_store(
        f"s3://bkt-x?endpoint=http://127.0.0.1:{port}&access_key=a&secret_key=b&region=us-east-1"
        "&retries=1&connect_timeout=0.5"
    )
    started = time.monotonic()
    for call in (
        lambda: store.put_bytes("k", b"1"),
        lambda: store.get_bytes("k"),
        lambda: list(store.list("p/")),
    ):
        with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{port}"):
            call()
    assert time.monotonic() - started < 10


def test_unroutable_endpoint_is_bounded_by_connect_timeout() -> None:
    # TEST-NET-1 is never routed: either refused at once or timed out after connect_timeout.
    store = open_store(
        "s3://bkt-x?endpoint=http://192.0.2.1:9&access_key=a&secret_key=b&region=us-east-1"
        "&retries=0&connect_timeout=0.3"
    )
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"192\.0\.2\.1:9"):
        store.get_bytes("k")
    assert time.monotonic() - started < 3


def test_non_s3_server_is_reported_not_a_traceback(tmp_path: Path) -> None:
    """A web server that is not S3 (a wrong port) answering 404 must not look like a missing object."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        do_PUT = do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        store = open_store(
            f"s3://bkt-x?endpoint=http://127.0.0.1:{port}&access_key=a&secret_key=b&region=us-east-1&retries=0"
        )
        with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{port}.*S3 server"):
            store.get_bytes("k")
    finally:
        server.shutdown()


# -- open_store -----------------------------------------------------------------------------------


def test_open_store_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(f"file://{tmp_path}/s").url == str(tmp_path / "s")
    assert open_store(f"file://localhost{tmp_path}/s").url == str(tmp_path / "s")
    monkeypatch.setenv("STAGETUNE_STORE", str(tmp_path / "from-env"))
    assert open_store().url == str(tmp_path / "from-env")


def test_default_store_url_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAGETUNE_STORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_store_url() == str(tmp_path / "xdg" / "stagetune" / "store")
    assert open_store().url == default_store_url()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_url() == str(tmp_path / "home" / ".cache" / "stagetune" / "store")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_store_url() == str(tmp_path / "home" / ".cache" / "stagetune" / "store")


def test_open_store_s3_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [
        "STAGETUNE_S3_ACCESS_KEY",
        "STAGETUNE_S3_SECRET_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]:
        monkeypatch.delenv(var, raising=False)
    store = open_store("s3://my-bucket/a/b/?endpoint=https://s3.example.com:9000&region=eu-west-1")
    assert isinstance(store, S3Store)
    assert (store.endpoint, store.bucket, store.prefix, store.secure) == (
        "s3.example.com:9000",
        "my-bucket",
        "a/b/",
        True,
    )
    assert store.anonymous
    plain = open_store("s3://bkt?endpoint=host:9000&secure=false")
    assert isinstance(plain, S3Store) and not plain.secure and plain.prefix == ""
    aws = open_store("s3://bkt")
    assert isinstance(aws, S3Store) and aws.endpoint == "s3.amazonaws.com" and aws.secure


def test_open_store_credentials_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "aws-a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-s")
    monkeypatch.delenv("STAGETUNE_S3_ACCESS_KEY", raising=False)
    monkeypatch.delenv("STAGETUNE_S3_SECRET_KEY", raising=False)

    def access_key(url: str) -> str:
        store = open_store(url)
        assert isinstance(store, S3Store)
        creds = store._client._provider.retrieve()  # type: ignore[union-attr]
        return creds.access_key

    assert access_key("s3://bkt?endpoint=http://h:1") == "aws-a"
    monkeypatch.setenv("STAGETUNE_S3_ACCESS_KEY", "st-a")
    monkeypatch.setenv("STAGETUNE_S3_SECRET_KEY", "st-s")
    assert access_key("s3://bkt?endpoint=http://h:1") == "st-a"
    assert access_key("s3://bkt?endpoint=http://h:1&access_key=url-a&secret_key=url-s") == "url-a"
    monkeypatch.delenv("STAGETUNE_S3_SECRET_KEY")
    with pytest.raises(ConfigError, match="STAGETUNE_S3_ACCESS_KEY"):
        open_store("s3://bkt?endpoint=http://h:1")


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3://UPPER?endpoint=http://h:1", "bucket name"),
        ("s3://ab?endpoint=http://h:1", "bucket name"),
        ("s3://bkt?endpiont=http://h:1", "unknown option.*endpiont"),
        ("s3://bkt?endpoint=ftp://h:1", "endpoint"),
        ("s3://bkt?endpoint=http://h:1/path", "no path"),
        ("s3://bkt?endpoint=http://h:port", "invalid port"),
        ("s3://bkt?endpoint=http://h:1&secure=true", "contradicts"),
        ("s3://bkt?endpoint=http://h:1&secure=maybe", "true or false"),
        ("s3://bkt?endpoint=http://h:1&retries=many", "int"),
        ("s3://bkt?endpoint=http://h:1&retries=1&retries=2", "twice"),
        ("s3://bkt?endpoint=http://h:1&access_key=a", "only one"),
        ("s3://bkt/a/../b?endpoint=http://h:1", "prefix"),
        ("gs://bkt", "unsupported scheme"),
        ("file://otherhost/x", "local path"),
        ("s3:bkt", "unknown form"),
        ("   ", "empty"),
    ],
)
def test_open_store_malformed_urls_name_the_url(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        open_store(url)
    assert url.strip()[:6] in str(info.value)


def test_secret_key_never_appears_in_errors_or_url() -> None:
    with pytest.raises(ConfigError) as info:
        open_store("s3://bkt?endpoint=http://h:1&secret_key=hunter2&bogus=1")
    assert "hunter2" not in str(info.value)
    store = open_store("s3://bkt?endpoint=http://h:1&access_key=a&secret_key=hunter2")
    assert "hunter2" not in store.url and "hunter2" not in repr(store)


def test_check_key_accepts_ordinary_keys() -> None:
    for key in ["a", "cache/vae/ab12/shards/x-1.safetensors", "jobs/j-1/events.jsonl", ".hidden", "a..b"]:
        assert check_key(key) == key


def test_s3_retries_transient_connection_errors(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib3

    store = open_store(s3_server.url(fresh_bucket(), retries="3"))
    assert isinstance(store, S3Store)
    store.backoff = 0.01
    store.put_bytes("k", b"value")
    real = store._client.get_object
    failures = iter([urllib3.exceptions.ProtocolError("connection reset"), ConnectionResetError("reset")])

    def flaky(*args: object, **kwargs: object):  # noqa: ANN202
        for exc in failures:
            raise exc
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store._client, "get_object", flaky)
    assert store.get_bytes("k") == b"value"


def test_s3_listing_resumes_after_the_last_key_on_errors(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib3

    store = open_store(s3_server.url(fresh_bucket()))
    assert isinstance(store, S3Store)
    store.backoff = 0.01
    keys = [f"l/{i}" for i in range(6)]
    for key in keys:
        store.put_bytes(key, b".")
    real = store._client.list_objects
    starts: list[object] = []

    def flaky(bucket: str, **kwargs: object):  # noqa: ANN202
        starts.append(kwargs.get("start_after"))
        for n, obj in enumerate(real(bucket, **kwargs)):  # type: ignore[arg-type]
            if len(starts) == 1 and n == 3:
                raise urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out")  # type: ignore[arg-type]
            yield obj

    monkeypatch.setattr(store._client, "list_objects", flaky)
    assert list(store.list("l/")) == keys  # no duplicates, nothing skipped
    assert starts == [None, "l/2"]


def test_size_without_reading(store) -> None:
    store.put_bytes("sized/a.bin", b"x" * 1234)
    assert store.size("sized/a.bin") == 1234
    assert store.size("sized/missing.bin") is None


def test_durable_puts_are_fsynced_and_coordination_puts_are_not(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lease claims are rewritten every few seconds; only data (shards, indexes, checkpoints) pays an fsync."""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store.put_bytes("a/claim.json", b"{}", durable=False)
    assert store.get_bytes("a/claim.json") == b"{}"
    unsynced = len(synced)
    store.put_bytes("a/shard.bin", b"data")
    assert store.get_bytes("a/shard.bin") == b"data"
    if isinstance(store, LocalStore):
        assert unsynced == 0 and len(synced) == 1
