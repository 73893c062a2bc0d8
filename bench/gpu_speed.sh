#!/usr/bin/env bash
# Every GPU figure of the speed work in one run, at most 590 s of parts on one H100/H200 (the device machine):
#   SD 1.5-size training at batch 1, 8, 32 (loralab's loop and the plain diffusers + LoRA step, with the
#   operators that allocate the most memory at each size), SDXL-size at batch 1 and 8, both sides compiled at
#   batch 32, the host-overhead ratio of bench/step_overhead.py and latent caching (bench/cache_speed.py).
#
#   bash bench/gpu_speed.sh --wheels    # here, once: diffusers 0.42.1 (the device image lacks it) into .whl/
#   bash bench/gpu_speed.sh             # there (carry .whl): gpu_speed.log and JSON under $OUT (default bench/results/gpu)
#   TINY=1 bash bench/gpu_speed.sh      # anywhere: the same steps on tiny models (checks the script)
set -u
if [ "${1:-}" = "--wheels" ]; then
    mkdir -p .whl && grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-dir)/info/exclude"
    exec python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
fi
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
fi
if [ "${TINY:-0}" = 1 ]; then SD15=tiny SDXL=tiny-sdxl B1=1 B8=2 B32=2 VAE=tiny
else SD15=sd15 SDXL=sdxl B1=1 B8=8 B32=32 VAE=sd15; fi
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
part() {  # name, time limit (s), script and arguments: its JSON goes to $OUT/<name>/, its output to $OUT/gpu_speed.log
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$OUT/gpu_speed.log"
    timeout -k 20 "$limit" python3 "$@" --out "$OUT/$name" 2>&1 | grep -v 'it/s\]\|step/s\]\|img/s\]\|caption/s\]' \
        > "$OUT/part.log"
    echo "exit ${PIPESTATUS[0]} after $SECONDS s" >> "$OUT/part.log"
    cat "$OUT/part.log" >> "$OUT/gpu_speed.log"; tail -n 16 "$OUT/part.log"; rm -f "$OUT/part.log"
}
part sd15 190 bench/train_speed.py --model $SD15 --batch $B1 $B8 $B32 --steps 10 --profile-memory
part sdxl 190 bench/train_speed.py --model $SDXL --batch $B1 $B8 --steps 5
part sd15_compiled 120 bench/train_speed.py --model $SD15 --batch $B32 --steps 10 --compile
part overhead 45 bench/step_overhead.py --rounds 3
part cache 45 bench/cache_speed.py --images 256 --vae $VAE --batch 8
