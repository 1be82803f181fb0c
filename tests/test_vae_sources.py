"""The VAE stage reads a row's image wherever its dataset lives: local path or an S3 dataset."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from fixtures_store import fresh_bucket
from PIL import Image

from stagetune.core.errors import InputError
from stagetune.vae.encode import DatasetImages


def test_rows_of_an_s3_dataset_are_read_with_its_aws_keys(s3_server, tmp_path) -> None:
    bucket = fresh_bucket()
    client = s3_server.client()
    client.make_bucket(bucket)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="PNG")
    client.put_object(bucket, "photos/red.png", io.BytesIO(buffer.getvalue()), len(buffer.getvalue()))
    local = tmp_path / "blue.png"
    Image.new("RGB", (20, 10), (0, 0, 255)).save(local)
    config = json.dumps([
        {"id": "remote", "type": "aws", "aws_bucket_name": bucket, "aws_data_prefix": "photos",
         "aws_endpoint_url": s3_server.endpoint, "aws_region_name": s3_server.region,
         "aws_access_key_id": s3_server.access_key, "aws_secret_access_key": s3_server.secret_key},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True},
    ])
    images = DatasetImages(config)
    red = images(SimpleNamespace(path=f"s3://{bucket}/photos/red.png", dataset_id="remote"))
    assert red.size == (40, 30) and red.getpixel((5, 5)) == (200, 10, 10)
    blue = images(SimpleNamespace(path=str(local), dataset_id="local-one"))  # local rows need no config
    assert blue.size == (20, 10)
    with pytest.raises(InputError, match="'gone' of the manifest is not in the data backend config"):
        images(SimpleNamespace(path=f"s3://{bucket}/photos/red.png", dataset_id="gone"))
