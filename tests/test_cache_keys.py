"""Cache keys are honest: change any one input and the key changes; change nothing and it does not,
in this process or another. A key that ignores an input serves stale latents or embeddings (SimpleTuner's
text cache ignores T5 length and padding); a key that changes needlessly throws away shared work."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagetune.core.manifest import pixel_key_for
from stagetune.models.sd3.text import SD3TextEncoder
from stagetune.models.sd3.vae import SD3LatentEncoder

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

sizes = st.lists(st.integers(1, 8192), min_size=2, max_size=2)
boxes = st.lists(st.integers(0, 8192), min_size=4, max_size=4)
hashes = st.text("0123456789abcdef", min_size=16, max_size=64)
pixel_inputs = st.tuples(hashes, st.none() | sizes, sizes, boxes, sizes)


def flip_last_byte(path: Path) -> None:
    """Change one weight byte (the last byte of a safetensors file is tensor data, not its header)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def models(tiny_sd3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model, a byte-identical copy elsewhere, and copies with one byte of one component changed."""
    root = tmp_path_factory.mktemp("key-models")
    out = {"original": tiny_sd3_path}
    for name, component in [("copy", None), ("vae-byte", "vae"), ("t5-byte", "text_encoder_3"),
                            ("clip-byte", "text_encoder")]:
        target = root / name
        shutil.copytree(tiny_sd3_path, target)
        if component:
            (weights,) = (target / component).glob("*.safetensors")
            flip_last_byte(weights)
        out[name] = target
    tokenizer_changed = root / "tokenizer-changed"
    shutil.copytree(tiny_sd3_path, tokenizer_changed)
    config = tokenizer_changed / "tokenizer_3" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["model_max_length"] = int(data.get("model_max_length") or 512) + 1
    config.write_text(json.dumps(data))
    out["tokenizer-changed"] = tokenizer_changed
    return out


@pytest.fixture(scope="module", autouse=True)
def _private_fingerprint_memo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
    yield
    mp.undo()


def vae(path: Path, dtype: torch.dtype = torch.float32) -> SD3LatentEncoder:
    return SD3LatentEncoder.from_pretrained(str(path), dtype=dtype, load=False)


def text(path: Path, dtype: torch.dtype = torch.float32) -> SD3TextEncoder:
    return SD3TextEncoder.from_pretrained(str(path), dtype=dtype, load=False)


# -- pixel and latent keys ---------------------------------------------------------------------------


@PROPERTY
@given(pixel_inputs, st.data())
def test_pixel_key_changes_with_any_one_input(inputs: tuple[Any, ...], data: st.DataObject) -> None:
    key = pixel_key_for(*inputs)
    assert key == pixel_key_for(*[list(v) if isinstance(v, list) else v for v in inputs]), "pure"
    assert key == pixel_key_for(*[tuple(v) if isinstance(v, list) else v for v in inputs]), "any sequence"
    which = data.draw(st.integers(0, 4), label="changed input")
    strategy = [hashes, st.none() | sizes, sizes, boxes, sizes][which]
    new = data.draw(strategy.filter(lambda v: v != inputs[which]), label="new value")
    changed = list(inputs)
    changed[which] = new
    assert pixel_key_for(*changed) != key


@PROPERTY
@given(pixel_inputs, pixel_inputs)
def test_latent_key_follows_the_pixel_key(models: dict[str, Path], a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    encoder = vae(models["original"])
    ka, kb = pixel_key_for(*a), pixel_key_for(*b)
    assert (encoder.latent_key(ka) == encoder.latent_key(kb)) == (ka == kb)
    assert encoder.latent_key(ka) != ka, "a latent key is not the pixel key: the VAE is part of it"


def test_vae_fingerprint_covers_weights_and_dtype_only(models: dict[str, Path]) -> None:
    pixel_key = pixel_key_for("ab" * 16, None, [80, 64], [8, 0, 72, 64], [64, 64])
    base = vae(models["original"])
    key = base.latent_key(pixel_key)
    # Same weights in another folder, or the text encoders changed: same fingerprint, caches shared.
    for same in ("copy", "t5-byte", "clip-byte", "tokenizer-changed"):
        assert vae(models[same]).fingerprint == base.fingerprint, same
        assert vae(models[same]).latent_key(pixel_key) == key, same
    # One byte of VAE weights, or another dtype: new fingerprint, new keys.
    changed = [vae(models["vae-byte"]), vae(models["original"], torch.bfloat16), vae(models["original"], torch.float16)]
    fingerprints = {base.fingerprint} | {e.fingerprint for e in changed}
    assert len(fingerprints) == 4
    assert len({key} | {e.latent_key(pixel_key) for e in changed}) == 4
    assert vae(models["original"], None).fingerprint == base.fingerprint, "dtype None means float32"


# -- text keys ---------------------------------------------------------------------------------------

captions = st.text(max_size=200)
lengths = st.integers(1, 512)
paddings = st.sampled_from(["unmodified", "zero"])


@PROPERTY
@given(captions, lengths, paddings, st.data())
def test_text_key_changes_with_caption_length_or_padding(
    models: dict[str, Path], caption: str, length: int, padding: str, data: st.DataObject
) -> None:
    encoder = text(models["original"])
    key = encoder.cache_key(caption, t5_max_length=length, t5_padding=padding)
    assert key == encoder.cache_key(caption, t5_max_length=length, t5_padding=padding)
    new_caption = data.draw(captions.filter(lambda c: c != caption), label="caption")
    new_length = data.draw(lengths.filter(lambda n: n != length), label="length")
    other_padding = "zero" if padding == "unmodified" else "unmodified"
    assert encoder.cache_key(new_caption, t5_max_length=length, t5_padding=padding) != key
    assert encoder.cache_key(caption, t5_max_length=new_length, t5_padding=padding) != key
    assert encoder.cache_key(caption, t5_max_length=length, t5_padding=other_padding) != key


def test_text_fingerprint_covers_every_encoder_tokenizer_and_dtype(models: dict[str, Path]) -> None:
    base = text(models["original"])
    key = base.cache_key("a red square", t5_max_length=77, t5_padding="zero")
    copy = text(models["copy"])
    assert copy.fingerprint == base.fingerprint and copy.cache_key("a red square", t5_max_length=77,
                                                                    t5_padding="zero") == key
    assert text(models["vae-byte"]).fingerprint == base.fingerprint, "the VAE does not change embeddings"
    changed = [text(models[m]) for m in ("t5-byte", "clip-byte", "tokenizer-changed")]
    changed += [text(models["original"], torch.bfloat16)]
    assert len({base.fingerprint} | {e.fingerprint for e in changed}) == 5
    assert len({key} | {e.cache_key("a red square", t5_max_length=77, t5_padding="zero") for e in changed}) == 5


# -- purity across processes -------------------------------------------------------------------------

_OTHER_PROCESS = """
import json, sys, torch
from stagetune.core.manifest import pixel_key_for
from stagetune.models.sd3.text import SD3TextEncoder
from stagetune.models.sd3.vae import SD3LatentEncoder
cases = json.load(sys.stdin)
vae = SD3LatentEncoder.from_pretrained(sys.argv[1], load=False)
text = SD3TextEncoder.from_pretrained(sys.argv[1], dtype=torch.bfloat16, load=False)
json.dump({
    "latent": [vae.latent_key(pixel_key_for(*c)) for c in cases["pixels"]],
    "text": [text.cache_key(c, t5_max_length=n, t5_padding=p) for c, n, p in cases["captions"]],
}, sys.stdout)
"""


def test_keys_are_the_same_in_another_process(models: dict[str, Path], tmp_path: Path) -> None:
    """Another interpreter, another hash seed, a cold fingerprint memo and the model copy: same keys."""
    rng = random.Random(5)
    alphabet = "abcXYZ 0é漢🙂\n\t\"'\\"
    pixels = [
        [f"{rng.getrandbits(128):032x}", None if rng.random() < 0.3 else [rng.randint(1, 4096)] * 2,
         [rng.randint(1, 4096), rng.randint(1, 4096)], [rng.randint(0, 64) for _ in range(4)], [64, 64]]
        for _ in range(40)
    ]
    caps = [["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))), rng.choice([77, 154, 256]),
             rng.choice(["unmodified", "zero"])] for _ in range(40)]
    encoder_vae = vae(models["original"])
    encoder_text = text(models["original"], torch.bfloat16)
    here = {
        "latent": [encoder_vae.latent_key(pixel_key_for(*c)) for c in pixels],
        "text": [encoder_text.cache_key(c, t5_max_length=n, t5_padding=p) for c, n, p in caps],
    }
    env = dict(os.environ, PYTHONHASHSEED="12345", XDG_CACHE_HOME=str(tmp_path / "cold-memo"))
    done = subprocess.run([sys.executable, "-c", _OTHER_PROCESS, str(models["copy"])],
                          input=json.dumps({"pixels": pixels, "captions": caps}), capture_output=True,
                          text=True, env=env, timeout=120, check=True)
    assert json.loads(done.stdout) == here
