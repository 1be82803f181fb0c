"""Tokenizers built offline, for tiny test models.

No tokenizer can be downloaded where the tests run, so the tiny model factories build them from local
material: CLIP's real byte-level BPE (the vocabulary file that ``open-clip-torch`` ships, so token ids equal
the real CLIP ids) and sentencepiece models trained on generated text (T5 for SD3, Gemma for Sana).

Every builder writes its files into a folder and loads the tokenizer back with ``from_pretrained(folder)``:
transformers 5 silently builds an empty vocabulary when given bare file paths, and loading from a folder is
the code path a real model takes.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stagetune.core.errors import NotFoundError
from stagetune.models.loading import MODEL_LOAD_LOCK

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, GemmaTokenizer, T5Tokenizer

CLIP_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (openai/CLIP's SimpleTokenizer): with 2 × 256 byte
# symbols and 2 special tokens that gives the 49408-token vocabulary every CLIP text encoder has.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408

# Characters every sentencepiece model must know, so that ASCII captions never become <unk>.
PRINTABLE_ASCII = string.ascii_letters + string.digits + string.punctuation


def clip_bpe_path() -> Path:
    """Locate open_clip's BPE file without importing open_clip.

    Importing it pulls torchvision, which breaks diffusers next to a CPU torch (training-facts.md); the
    package is installed ``--no-deps`` only for this file.
    """
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / CLIP_BPE_FILENAME
        if candidate.is_file():
            return candidate
    raise NotFoundError(
        f"CLIP's BPE vocabulary {CLIP_BPE_FILENAME} was not found: install it with "
        "`pip install --no-deps open-clip-torch` (it is only read, never imported)"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte → printable-character table (the BPE works on these characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` in Hugging Face's CLIP layout from open_clip's BPE file."""
    lines = gzip.decompress(clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += [CLIP_BOS, CLIP_EOS]
    encoder = {token: index for index, token in enumerate(vocab)}
    if len(encoder) != CLIP_VOCAB_SIZE:
        raise NotFoundError(f"{clip_bpe_path()} gives {len(encoder)} tokens, expected {CLIP_VOCAB_SIZE}")
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path = folder / "vocab.json"
    merges_path = folder / "merges.txt"
    vocab_path.write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer(
    folder: Path, *, pad_token: str = CLIP_EOS, model_max_length: int = 77
) -> CLIPTokenizer:
    """A real CLIP tokenizer (same ids as openai/clip-vit-large-patch14), built offline in ``folder``.

    SD3's first tokenizer pads with ``<|endoftext|>``, its second (CLIP-G) with ``"!"`` (id 0): pass
    ``pad_token="!"`` for that one, since the pad id changes the hidden states after the end of text.
    """
    with MODEL_LOAD_LOCK:  # lazy library modules: one importing thread at a time (models/warmup.py)
        from transformers import CLIPTokenizer

    write_clip_vocab(folder)
    return CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=model_max_length)


_WORDS = (
    "a an the photo painting drawing render of cat dog bird horse house tree forest red blue green yellow "
    "black white large small tiny huge on in at with under over near sky river lake sea mountain city "
    "village night day morning evening woman man child people car street road flower garden portrait "
    "landscape bright dark old new wooden stone glass metal sunny rainy foggy soft sharp detailed style "
    "by artist close up view and"
).split()
_SYLLABLES = (
    "ka lo mi ne ru sa ti vo ze pa qu ghi bor tel wan dra fly sch ing tion ed er ly st ph th ck ou ea"
).split()


def generated_sentences(count: int = 600, *, seed: int = 0) -> list[str]:
    """Deterministic caption-like text: real words, invented words, capitals, digits and punctuation.

    A few hundred sentences give sentencepiece enough distinct pieces for a ~512-token vocabulary; the last
    sentence holds every printable ASCII character so none of them is left out of the model.
    """
    rng = random.Random(seed)
    words = list(_WORDS)
    words += ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    sentences = []
    for _ in range(count):
        chosen = [rng.choice(words) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            chosen[0] = chosen[0].capitalize()
        sentence = " ".join(chosen) + rng.choice([".", ",", "!", "?", ""])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 9999)}"
        sentences.append(sentence)
    sentences.append(" ".join(PRINTABLE_ASCII))
    return sentences


def train_sentencepiece(
    sentences: Sequence[str],
    *,
    vocab_size: int,
    special_pieces: Sequence[tuple[str, str]],
    model_type: str = "unigram",
) -> bytes:
    """Train a sentencepiece model in memory and return its serialised bytes.

    ``special_pieces`` lists ``(role, piece)`` in id order, roles being ``pad``, ``eos``, ``bos``, ``unk``:
    T5 wants ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 and no ``<bos>``; Gemma ``<pad>`` 0, ``<eos>`` 1,
    ``<bos>`` 2, ``<unk>`` 3. One thread and no shuffling make the bytes depend on the input only.
    """
    import sentencepiece as spm

    options: dict[str, object] = {"pad_id": -1, "eos_id": -1, "bos_id": -1, "unk_id": -1}
    for index, (role, piece) in enumerate(special_pieces):
        if f"{role}_id" not in options:
            raise ValueError(f"unknown special piece role {role!r}")
        options[f"{role}_id"] = index
        options[f"{role}_piece"] = piece
    if options["unk_id"] == -1:
        raise ValueError("sentencepiece needs an unk piece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        required_chars=PRINTABLE_ASCII,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
        **options,
    )
    return model.getvalue()


T5_SPECIAL_PIECES = (("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>"))


def build_t5_tokenizer(folder: Path, *, vocab_size: int = 512, seed: int = 0) -> T5Tokenizer:
    """A T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no sentinel ids) trained offline in ``folder``.

    ``extra_ids=0``: SD3 never uses T5's sentinel tokens and they would only grow the embedding table.
    """
    with MODEL_LOAD_LOCK:  # lazy library modules: one importing thread at a time (models/warmup.py)
        from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(
        generated_sentences(seed=seed), vocab_size=vocab_size, special_pieces=T5_SPECIAL_PIECES
    )
    (folder / "spiece.model").write_bytes(model)
    return T5Tokenizer.from_pretrained(str(folder), extra_ids=0, model_max_length=512)


GEMMA_SPECIAL_PIECES = (("pad", "<pad>"), ("eos", "<eos>"), ("bos", "<bos>"), ("unk", "<unk>"))
#: Gemma's own tokenizer has no practical length limit; Sana's complex human instruction alone is hundreds of
#: tokens, and a smaller limit only makes transformers warn about sequences the model does take.
GEMMA_MODEL_MAX_LENGTH = 8192


def build_gemma_tokenizer(folder: Path, *, vocab_size: int = 512, seed: int = 0) -> GemmaTokenizer:
    """A Gemma tokenizer (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3) trained offline in ``folder``.

    ``add_bos_token=True``: transformers 5 leaves ``<bos>`` out by default, and Sana keeps the first position
    of every prompt's states (``select_index = [0] + …``) on the assumption that it holds ``<bos>``.
    """
    with MODEL_LOAD_LOCK:  # lazy library modules: one importing thread at a time (models/warmup.py)
        from transformers import GemmaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(
        generated_sentences(seed=seed), vocab_size=vocab_size, special_pieces=GEMMA_SPECIAL_PIECES
    )
    (folder / "tokenizer.model").write_bytes(model)
    return GemmaTokenizer.from_pretrained(str(folder), add_bos_token=True, model_max_length=GEMMA_MODEL_MAX_LENGTH)
