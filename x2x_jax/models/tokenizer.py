"""The CLIP ViT-L/14 tokenizer of SD 1.x, built offline.

The BPE merges come from `bpe_simple_vocab_16e6.txt.gz`, which ships inside the open-clip-torch wheel; we find that
file without importing open_clip (it needs torch/torchvision), derive `vocab.json` + `merges.txt` once into a
cache directory, and hand them to `transformers.CLIPTokenizer`. A diffusers directory's own `tokenizer/` wins.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path

import ftfy
import numpy as np
from transformers import CLIPTokenizer

from x2x_jax.errors import WeightsError

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_NUM_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges: vocab = 2*256 bytes + merges + 2 specials = 49408
VOCAB_SIZE = 2 * 256 + _NUM_MERGES + 2


def bpe_path() -> Path:
    """`$X2X_CLIP_BPE`, else the file inside the installed open_clip package (located, not imported)."""
    env = os.environ.get("X2X_CLIP_BPE")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise WeightsError(f"X2X_CLIP_BPE={env} is not a file (expected {BPE_FILENAME})")
        return path
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / BPE_FILENAME
        if path.is_file():
            return path
    raise WeightsError(
        f"CLIP tokenizer vocabulary {BPE_FILENAME} not found: run `pip install --no-deps open-clip-torch` "
        "or set X2X_CLIP_BPE to the file's path"
    )


def cache_dir() -> Path:
    """`$X2X_CACHE_DIR`, else `$XDG_CACHE_HOME/x2x_jax`, else `~/.cache/x2x_jax`."""
    if os.environ.get("X2X_CACHE_DIR"):
        return Path(os.environ["X2X_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "x2x_jax"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table (whitespace/control bytes moved above 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})  # order matters: it is the vocab's order
    return table


def derive_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's own construction of the vocabulary from the merges file."""
    lines = gzip.decompress(Path(bpe_gz).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise WeightsError(f"{bpe_gz}: expected {_NUM_MERGES} BPE merges after the header line, file is malformed")
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _derived_files(bpe_gz: Path) -> Path:
    """Cache folder holding vocab.json + merges.txt derived from `bpe_gz` (keyed by its hash)."""
    digest = hashlib.sha256(Path(bpe_gz).read_bytes()).hexdigest()[:16]
    folder = cache_dir() / f"clip_tokenizer_{digest}"
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        vocab, merges = derive_vocab_and_merges(bpe_gz)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        _write_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    return folder


def _from_vocab_files(folder: Path) -> CLIPTokenizer:
    # Not CLIPTokenizer(vocab_file=..., merges_file=...): transformers 5 silently builds a 3-token vocab from that.
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=MAX_LENGTH,
    )


@functools.cache
def _clip_vit_l14_tokenizer(bpe_gz: Path) -> CLIPTokenizer:
    tok = _from_vocab_files(_derived_files(bpe_gz))
    if len(tok) != VOCAB_SIZE:
        raise WeightsError(f"CLIP tokenizer built from {bpe_gz} has {len(tok)} tokens, expected {VOCAB_SIZE}")
    return tok


def load_tokenizer(diffusers_dir: str | os.PathLike | None = None) -> CLIPTokenizer:
    """`diffusers_dir/tokenizer/` when it exists, else the SD 1.x CLIP tokenizer built from the BPE file."""
    if diffusers_dir is not None:
        folder = Path(diffusers_dir) / "tokenizer"
        if folder.is_dir():
            try:
                tok = CLIPTokenizer.from_pretrained(folder)
            except (OSError, ValueError, json.JSONDecodeError) as e:
                raise WeightsError(f"{folder}: cannot load the tokenizer ({' '.join(str(e).split())})") from e
            if len(tok) < 3 or tok.eos_token_id is None:
                raise WeightsError(f"{folder}: tokenizer has {len(tok)} tokens and no end token; files incomplete?")
            return tok
    return _clip_vit_l14_tokenizer(bpe_path())


def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy, double html unescape, whitespace collapsed (the tokenizer lower-cases)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def tokenize(
    tokenizer: CLIPTokenizer, texts: list[str], max_length: int = MAX_LENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 (B, max_length), truncated bool (B,)): BOS text EOS, padded with the tokenizer's pad token.

    Texts longer than `max_length` tokens (specials included) are cut to BOS + first words + EOS; `truncated`
    says which, so callers can warn.
    """
    cleaned = [clean_text(t) for t in texts]
    full = tokenizer(cleaned, add_special_tokens=True, verbose=False)["input_ids"]
    truncated = np.array([len(ids) > max_length for ids in full], dtype=np.bool_)
    ids = tokenizer(cleaned, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return ids["input_ids"].astype(np.int32), truncated


def save_tokenizer(tokenizer: CLIPTokenizer, dst_dir: str | os.PathLike) -> Path:
    """Write `dst_dir/tokenizer/` as in a diffusers folder (vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json); `load_tokenizer(dst_dir)` and `CLIPTokenizer.from_pretrained` read it back."""
    folder = Path(dst_dir) / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    # transformers 5 writes only tokenizer.json + tokenizer_config.json; diffusers folders (and transformers 4)
    # are read from vocab.json + merges.txt + special_tokens_map.json, so write those too.
    vocab = tokenizer.get_vocab()
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    _write_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    _write_atomic(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs))
    specials = {
        "bos_token": str(tokenizer.bos_token),
        "eos_token": str(tokenizer.eos_token),
        "unk_token": str(tokenizer.unk_token),
        "pad_token": str(tokenizer.pad_token),
    }
    _write_atomic(folder / "special_tokens_map.json", json.dumps(specials, indent=2))
    return folder
