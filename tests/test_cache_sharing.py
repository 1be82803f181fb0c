"""Two jobs over overlapping datasets share every common latent and embedding (content addressing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from test_end_to_end import CAPTIONS, make_dataset, train_embedded, write_configs


def test_overlapping_datasets_share_common_entries(tmp_path: Path, tiny_sd3_path: Path) -> None:
    make_dataset(tmp_path / "all")
    first, second = tmp_path / "first", tmp_path / "second"
    for job, names in ((first, range(0, 6)), (second, range(3, 8))):  # images 3, 4, 5 in both
        (job / "data").mkdir(parents=True)
        for i in names:
            for suffix in (".png", ".txt"):
                shutil.copy(tmp_path / "all" / f"image_{i}{suffix}", job / "data" / f"copy_{i}{suffix}")
    store = str(tmp_path / "store")
    runs = []
    for job in (first, second):
        config = write_configs(job, tiny_sd3_path, steps=1, validation=False)
        data = json.loads((job / "multidatabackend.json").read_text())
        data[0]["crop_aspect"] = "preserve"  # not the same options as the default e2e run, on purpose
        (job / "multidatabackend.json").write_text(json.dumps(data))
        runs.append(train_embedded(config, store))
    latents = runs[1].phase("vae").outputs
    assert latents["total"] == "5" and latents["hits"] == "3" and latents["encoded"] == "2"
    texts = runs[1].phase("text").outputs
    shared_captions = {CAPTIONS[i] for i in range(3, 6)} | {"", "blurry, cropped, ugly"}
    assert int(texts["hits"]) == len(shared_captions)
    assert int(texts["encoded"]) == len({CAPTIONS[i] for i in range(6, 8)})
