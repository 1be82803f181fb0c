"""The tiny SD3 model, the component loaders and model fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import pytest
import torch

from stagetune.core.errors import InputError, NotFoundError
from stagetune.models import fingerprint as fp
from stagetune.models.sd3 import components
from stagetune.models.sd3.tiny import SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR, TINY_SD3, build_tiny_sd3


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fingerprint memos go to a per-test cache, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


@pytest.fixture(scope="module")
def second_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("rebuild") / "again", seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_build(tiny_sd3_path: Path, second_build: Path) -> None:
    first, second = _files(tiny_sd3_path), _files(second_build)
    assert sorted(first) == sorted(second)
    assert "transformer/diffusion_pytorch_model.safetensors" in first
    different = [name for name in first if first[name] != second[name]]
    assert different == []
    size_mb = sum(len(data) for data in first.values()) / 1e6
    assert 5 < size_mb < 30


def test_build_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(InputError, match="taken"):
        build_tiny_sd3(tmp_path / "taken")


def test_configs_have_sd3_values(tiny_sd3_path: Path) -> None:
    vae = json.loads((tiny_sd3_path / "vae/config.json").read_text())
    assert vae["shift_factor"] == SD3_VAE_SHIFT_FACTOR == 0.0609
    assert vae["scaling_factor"] == SD3_VAE_SCALING_FACTOR == 1.5305
    assert len(vae["block_out_channels"]) == 4 and vae["latent_channels"] == 16
    transformer = json.loads((tiny_sd3_path / "transformer/config.json").read_text())
    assert transformer["num_layers"] == 2 and transformer["num_attention_heads"] == 4
    assert transformer["attention_head_dim"] == 8 and transformer["caption_projection_dim"] == 32
    assert transformer["joint_attention_dim"] == TINY_SD3.t5_d_model == 96
    assert transformer["pooled_projection_dim"] == 64
    scheduler = json.loads((tiny_sd3_path / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0


def test_pipeline_generates_a_64px_image(tiny_sd3_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    assert pipe.vae_scale_factor == 8
    out = pipe(
        prompt="a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (1, 64, 64, 3)
    assert out.images.min() >= 0.0 and out.images.max() <= 1.0 and out.images.std() > 0


def test_tokenizers_match_real_clip_and_never_emit_unk(tiny_sd3_path: Path) -> None:
    clip_l, clip_g, t5 = components.load_tokenizers(str(tiny_sd3_path))
    # Ids of openai/clip-vit-large-patch14's tokenizer for this text.
    assert clip_l("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_l.pad_token_id == 49407 and clip_g.pad_token == "!" and clip_g.pad_token_id == 0
    assert clip_g("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    ids = t5(string.printable.strip() + " Zebra crossing, 1984!").input_ids
    assert t5.unk_token_id not in ids and ids[-1] == 1


def test_frozen_parts_are_shared_trainable_parts_are_not(tiny_sd3_path: Path) -> None:
    path = str(tiny_sd3_path)
    components.clear_component_cache()
    vae = components.load_vae(path)
    assert components.load_vae(path) is vae
    assert components.load_vae(path, dtype=torch.bfloat16) is not vae
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training

    text = components.load_text_encoders(path)
    again = components.load_text_encoders(path)
    assert again.text_encoder is text.text_encoder and again.text_encoder_3 is text.text_encoder_3
    assert again.tokenizer is not text.tokenizer
    assert not any(p.requires_grad for p in text.text_encoder_2.parameters())

    first, second = components.load_transformer(path), components.load_transformer(path)
    assert first is not second
    weight = first.transformer_blocks[0].attn.to_q.weight
    assert weight.requires_grad and weight.data_ptr() != second.transformer_blocks[0].attn.to_q.weight.data_ptr()
    assert torch.equal(weight, second.transformer_blocks[0].attn.to_q.weight)

    scheduler = components.load_scheduler(path)
    assert scheduler is not components.load_scheduler(path) and scheduler.config.shift == 3.0


def test_lora_targets_hit_the_image_stream_attention(tiny_sd3_path: Path) -> None:
    assert components.SD3_LORA_TARGET_MODULES == ("to_k", "to_q", "to_v", "to_out.0")
    transformer = components.load_transformer(str(tiny_sd3_path))
    names = [name for name, _ in transformer.named_modules()]
    hits = {t: [n for n in names if n == t or n.endswith("." + t)] for t in components.SD3_LORA_TARGET_MODULES}
    assert all(len(found) == TINY_SD3.transformer_layers for found in hits.values())
    assert all("add_" not in name for found in hits.values() for name in found)
    for target in components.DIFFUSERS_SD3_LORA_TARGET_MODULES:
        assert any(n.endswith("." + target) for n in names)


def test_missing_models_are_named(tiny_sd3_path: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(NotFoundError, match="no-such-model") as info:
        components.load_transformer(str(missing))
    assert info.value.field == "pretrained_model_name_or_path"
    with pytest.raises(NotFoundError, match="'vae_x'"):
        components.load_vae(str(tiny_sd3_path), subfolder="vae_x")
    broken = tmp_path / "broken"
    (broken / "vae").mkdir(parents=True)
    with pytest.raises(InputError, match="broken/vae"):
        components.load_vae(str(broken))
    with pytest.raises(NotFoundError, match="no-such-model"):
        fp.model_fingerprint(str(missing), ["vae"], revision=None, extra={})
    with pytest.raises(NotFoundError, match="has no subfolder 'nope'"):
        fp.model_fingerprint(str(tiny_sd3_path), ["nope"], revision=None, extra={})


def test_fingerprint_is_a_content_hash(tiny_sd3_path: Path, second_build: Path, tmp_path: Path) -> None:
    def of(path: Path, subfolders: list[str], **extra: object) -> str:
        return fp.model_fingerprint(str(path), subfolders, revision=None, extra={"dtype": "float32", **extra})

    base = of(tiny_sd3_path, ["vae"])
    assert len(base) == 32 and int(base, 16) >= 0
    assert of(second_build, ["vae"]) == base  # same bytes elsewhere: same fingerprint, caches shared
    assert of(tiny_sd3_path, ["vae"], dtype="bfloat16") != base
    assert of(tiny_sd3_path, ["vae"], option=1) != base
    assert of(tiny_sd3_path, ["vae", "transformer"]) != base
    assert of(tiny_sd3_path, ["transformer", "vae"]) == of(tiny_sd3_path, ["vae", "transformer"])

    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd3_path / "vae", copy / "vae")
    (copy / "vae" / ".cache").mkdir()
    (copy / "vae" / ".cache" / "junk").write_text("ignored")
    assert of(copy, ["vae"]) == base
    config = json.loads((copy / "vae/config.json").read_text())
    config["scaling_factor"] = 1.0
    (copy / "vae/config.json").write_text(json.dumps(config))
    assert of(copy, ["vae"]) != base


def test_file_hashes_are_memoised_by_size_and_mtime(
    tiny_sd3_path: Path, tmp_path: Path, _private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_sd3_path / "transformer", model / "transformer")
    first = fp.model_fingerprint(str(model), ["transformer"], revision=None, extra={})
    memo = json.loads((_private_cache / "stagetune" / "fingerprints.json").read_text())
    weights = str((model / "transformer" / "diffusion_pytorch_model.safetensors").absolute())
    assert memo[weights]["size"] == os.path.getsize(weights) and len(memo[weights]["xxh3_128"]) == 32

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(fp, "hash_file", no_hashing)
    assert fp.model_fingerprint(str(model), ["transformer"], revision=None, extra={}) == first

    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(_private_cache))
    data = bytearray(Path(weights).read_bytes())
    data[-1] ^= 1
    Path(weights).write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))  # a changed mtime invalidates the memo entry
    assert fp.model_fingerprint(str(model), ["transformer"], revision=None, extra={}) != first


def test_hub_ids_resolve_to_the_cached_snapshot(
    tiny_sd3_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--example--tiny-sd3"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        blob = fp.hash_file(tiny_sd3_path / "vae" / name)
        shutil.copy(tiny_sd3_path / "vae" / name, repo / "blobs" / blob)
        link = repo / "snapshots" / commit / "vae" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../../../blobs") / blob)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    root = fp.resolve_model_root("example/tiny-sd3", ["vae"], revision=None)
    assert root == repo / "snapshots" / commit
    hub = fp.model_fingerprint("example/tiny-sd3", ["vae"], revision=None, extra={})
    assert hub == fp.model_fingerprint("example/tiny-sd3", ["vae"], revision=commit, extra={})
    assert len(hub) == 32
    with pytest.raises(NotFoundError, match="example/other"):
        fp.model_fingerprint("example/other", ["vae"], revision=None, extra={})
