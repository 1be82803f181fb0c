"""The VAE stage reads a row's image wherever its dataset lives: local path or an S3 dataset."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from fixtures_store import fresh_bucket
from PIL import Image

from stagetune.core.errors import InputError
from stagetune.core.latents import DatasetImages


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

    def row(path: str, dataset_id: str, size: tuple[int, int]) -> SimpleNamespace:
        whole = [0, 0, *size]
        return SimpleNamespace(path=path, dataset_id=dataset_id, original_size=list(size), downsample_size=None,
                               intermediary_size=list(size), crop_box=whole, target_size=list(size))

    red = images(row(f"s3://{bucket}/photos/red.png", "remote", (40, 30)))
    assert tuple(red.shape) == (3, 30, 40)
    assert red[:, 5, 5].tolist() == pytest.approx([200 / 127.5 - 1, 10 / 127.5 - 1, 10 / 127.5 - 1])
    blue = images(row(str(local), "local-one", (20, 10)))  # local rows need no config
    assert tuple(blue.shape) == (3, 10, 20) and blue[2].min() == 1.0
    with pytest.raises(InputError, match="'gone' of the manifest is not in the data backend config"):
        images(row(f"s3://{bucket}/photos/red.png", "gone", (40, 30)))
