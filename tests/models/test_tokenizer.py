import json

import numpy as np
import pytest

from x2x_jax.errors import WeightsError
from x2x_jax.models import tokenizer as tk
from x2x_jax.models.tokenizer import VOCAB_SIZE, load_tokenizer, save_tokenizer, tokenize

GOLDEN_TEXT = "Add the finding of pleural effusion"
GOLDEN_IDS = [49406, 3536, 518, 6002, 539, 926, 33948, 1490, 9364, 49407]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("X2X_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("X2X_CLIP_BPE", raising=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("X2X_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("X2X_CLIP_BPE", raising=False)
        return load_tokenizer()


def test_vocab_size_guards_the_three_token_pitfall(tok):
    assert len(tok) == VOCAB_SIZE == 49408
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)


def test_golden_ids_padded_with_end_token(tok):
    ids, truncated = tokenize(tok, [GOLDEN_TEXT])
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert truncated.dtype == np.bool_ and not truncated[0]
    assert ids[0, : len(GOLDEN_IDS)].tolist() == GOLDEN_IDS
    assert (ids[0, len(GOLDEN_IDS) :] == 49407).all()


def test_cleaning_and_lower_case(tok):
    variants = [
        GOLDEN_TEXT,
        "ADD THE FINDING OF PLEURAL EFFUSION",
        "  Add the\tfinding\n\nof  pleural effusion  ",
    ]
    ids, _ = tokenize(tok, variants)
    assert (ids == ids[0]).all()
    # html entities (double-escaped too) and mojibake are repaired as CLIP's ftfy/html cleaning does
    a, _ = tokenize(tok, ["heart & lungs", "heart &amp; lungs", "heart &amp;amp; lungs"])
    assert (a == a[0]).all()
    b, _ = tokenize(tok, ["don't remove", "donâ€™t remove"])
    assert (b[0] == b[1]).all()
    c, _ = tokenize(tok, ["pleural effusion", "pleural effusions"])
    assert not (c[0] == c[1]).all()


def test_truncation_flag(tok):
    exact = " ".join(["lung"] * 75)  # 75 words + BOS + EOS = 77 tokens
    ids, truncated = tokenize(tok, [exact, exact + " lung", "short"])
    assert truncated.tolist() == [False, True, False]
    assert (ids[0] == ids[1]).all()  # cut to BOS + 75 words + EOS
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407


def test_derived_files_go_to_cache_dir(tmp_path):
    folder = tk._derived_files(tk.bpe_path())
    assert folder.parent == tmp_path / "cache"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    assert sorted(vocab.values()) == list(range(49408))


def test_saved_tokenizer_reloads_identically(tok, tmp_path):
    from transformers import CLIPTokenizer

    folder = save_tokenizer(tok, tmp_path / "export")
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    texts = [GOLDEN_TEXT, "Remove the cardiomegaly; résumé &amp; 12.5cm", " ".join(["x"] * 90)]
    want = tokenize(tok, texts)
    for again in (load_tokenizer(tmp_path / "export"), CLIPTokenizer.from_pretrained(folder)):
        assert len(again) == VOCAB_SIZE and again.pad_token_id == 49407
        got = tokenize(again, texts)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_diffusers_style_folder_without_tokenizer_json_wins(tok, tmp_path):
    # What SD 1.x / InstructPix2Pix folders ship: vocab.json + merges.txt + old-style configs, no tokenizer.json.
    src = tk._derived_files(tk.bpe_path())
    folder = tmp_path / "sd" / "tokenizer"
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_text((src / name).read_text(encoding="utf-8"), encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "!",
        "unk_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    own = load_tokenizer(tmp_path / "sd")
    assert len(own) == VOCAB_SIZE
    ids, _ = tokenize(own, [GOLDEN_TEXT])
    assert ids[0, : len(GOLDEN_IDS)].tolist() == GOLDEN_IDS
    assert (ids[0, len(GOLDEN_IDS) :] == 0).all()  # the folder's own pad token ("!" = 0, as SD 2.x) is kept


def test_missing_bpe_file_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("X2X_CLIP_BPE", str(tmp_path / "nope.txt.gz"))
    with pytest.raises(WeightsError, match="X2X_CLIP_BPE"):
        tk.bpe_path()
    monkeypatch.delenv("X2X_CLIP_BPE")
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError) as err:
        tk.bpe_path()
    assert "pip install --no-deps open-clip-torch" in str(err.value) and "\n" not in str(err.value)


def test_env_override_is_used(monkeypatch, tmp_path):
    real = tk.bpe_path()
    copy = tmp_path / "my_bpe.txt.gz"
    copy.write_bytes(real.read_bytes())
    monkeypatch.setenv("X2X_CLIP_BPE", str(copy))
    assert tk.bpe_path() == copy


@pytest.mark.oracle
def test_matches_openai_reference_tokenizer(tok):
    """OpenAI's own CLIP tokenizer (open_clip/tokenizer.py, loaded as a lone file: the package needs torchvision)."""
    import importlib.util

    pytest.importorskip("torch")
    path = tk.bpe_path().parent / "tokenizer.py"
    if not path.is_file():
        pytest.skip("open_clip/tokenizer.py not installed")
    spec = importlib.util.spec_from_file_location("_openai_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ref = module.SimpleTokenizer(bpe_path=str(tk.bpe_path()))
    texts = [
        GOLDEN_TEXT,
        "Remove the mild cardiomegaly, and add a LEFT-sided pneumothorax (~2cm)!",
        "résumé naïve café 北京 — “quotes” donâ€™t &amp;amp; <b>tags</b>",
        "Increase   the\tsize of the\nopacity in the right lower lobe; 3x4.5 mm. It's worse, isn't it?",
        "emoji 🫁 and numbers 12345 and symbols @#$%^&*",
        "",
    ]
    ids, _ = tokenize(tok, texts)
    for text, row in zip(texts, ids):
        words = ref.encode(text)
        assert row[1 : 1 + len(words)].tolist() == words, text
        assert row[0] == 49406 and row[1 + len(words)] == 49407
