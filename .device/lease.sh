#!/usr/bin/env bash
# Run on a lent GPU machine, from the repository root (see .device/README.md):
#   bash .device/lease.sh part1                        # call 1: keep part 1 of the GGUF on the machine
#   bash .device/lease.sh train T_GEN T_TRAIN EPOCHS [TRAIN ARGS]  # call 2: answer prompts T_GEN s, then
#                                                                   # train <= T_TRAIN s (extra args: e.g. --draft-layers 4)
# Call 2 resumes the self-distillation answers after those in .device/data/self.jsonl.xz (when
# carried) and returns all of them, compressed, with the trained drafter's files in $OUT.
set -euo pipefail
L=/tmp/lease
D=.device/data
mkdir -p "$L"
case "${1:-}" in
part1)
    cp "$D/gguf.part1" "$L/" && ls -l "$L" && nvidia-smi --query-gpu=name --format=csv,noheader ;;
train)
    T_GEN=${2:?T_GEN seconds}; T_TRAIN=${3:?T_TRAIN seconds}; EPOCHS=${4:?epochs}
    cat "$L/gguf.part1" "$D/gguf.part2" > "$L/smollm2.gguf"
    echo "$(cat "$D/gguf.sha256")  $L/smollm2.gguf" | sha256sum -c -
    python3 -m pip install -q --no-deps --no-index "$D"/gguf-*.whl
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    xz -dc "$D/prompts.jsonl.xz" > "$L/prompts.jsonl"
    xz -dc "$D/sharegpt2048.npz.xz" > "$L/sharegpt2048.npz"
    [ -f "$D/self.jsonl.xz" ] && xz -dc "$D/self.jsonl.xz" > "$L/self.jsonl"
    if [ "$T_GEN" -gt 0 ]; then
        # SIGTERM: the command closes its session and keeps every finished answer.
        timeout -k 60 "$T_GEN" redrafter self-data --base "$L/smollm2.gguf" --data "$L/prompts.jsonl" \
            --output "$L/self.jsonl" --max-samples 20000 --max-new-tokens 256 --max-prompt-tokens 512 \
            --batch-size 512 --device cuda || echo "self-data stopped (rc $?)"
    fi
    wc -l "$L/self.jsonl"
    xz -T0 -9 -c "$L/self.jsonl" > "$OUT/self.jsonl.xz"
    if [ "$T_TRAIN" -gt 0 ]; then
        timeout -k 60 "$T_TRAIN" redrafter train --base "$L/smollm2.gguf" --data "$L/sharegpt2048.npz" "$L/self.jsonl" \
            --output "$L/drafter" --seq-len 2048 --epochs "$EPOCHS" --lr 3e-3 --batch-size 2048 --draft-len 4 \
            --head shared --draft-vocab 8192 --labels kl --bf16 --save-dtype float16 --checkpoint-every 500 \
            --device cuda --cache-dir /dev/shm/teacher "${@:5}" || echo "train stopped (rc $?): its checkpoint is in $L/drafter"
        cp "$L"/drafter/{config.json,model.safetensors,metrics.json,training_config.json} "$OUT/" || ls -l "$L/drafter"
    fi
    ls -l "$OUT" ;;
*)
    echo "usage: $0 part1 | train T_GEN T_TRAIN EPOCHS [TRAIN ARGS]" >&2; exit 2 ;;
esac
