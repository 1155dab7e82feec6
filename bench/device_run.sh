#!/usr/bin/env bash
# Run GPU benchmark parts on the lent device machine, in the repository root of the copy there.
#
#   bench/device_run.sh gpu scale histdist normalize demo      # each part with its own timeout
#   bench/device_run.sh gpu=240 scale=90                       # NAME=SECONDS sets that timeout
#
# The machine has the image's torch/timm/transformers/... but none of stainctl's other needs;
# those travel as wheels in .whl/ (name `.whl` in the run's `carry`), installed with --no-deps
# into /tmp/site. The data folder travels as ./shared (the checkout's own, ignored by git);
# tests and benches look for ../shared, so it is linked there. All output goes to
# $OUT/device.log; bench/RESULTS.md (with what the parts added to their sections) and the added lines alone
# (RESULTS.new.md) are copied to $OUT at the end. A part that fails or times out is reported
# and the next one runs.
#
# Parts (override any with PART_CMD_<name>='...'):
#   gpu        python3 bench/gpu.py --device cuda
#   scale      python3 bench/scale.py --device cuda
#   histdist   python3 bench/translate_histdist.py --device cuda
#   normalize  python3 bench/normalize.py --device cuda
#   demo       $DEMO_CMD, default: sh bench/demo_retrain.sh cuda 2000 16 (issue 22), with
#              STAINCTL_DIRECT_READ=0: its inputs are JPEG tiles, which the direct reader decodes
#              with imagecodecs, not carried (26 MB); OpenSlide decodes them itself. Its OME-TIFF
#              inputs need tiffslide + imagecodecs and its closing main job needs pyvips: carry
#              those wheels too for that part to finish.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
LOG=$OUT/device.log
: >"$LOG"
log() { echo "$@" | tee -a "$LOG"; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
log "== device_run.sh $* ($(date -u '+%F %T UTC'), $(pwd))"

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
else
    log "!! no wheels in .whl/ (name .whl in the run's carry): stainctl's imports may fail"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! command -v python >/dev/null; then  # scripts that call `python`: the image has python3
    mkdir -p /tmp/pybin && ln -sf "$(command -v python3)" /tmp/pybin/python
    export PATH=/tmp/pybin:$PATH
fi
if [ -d shared ] && [ ! -e ../shared ]; then
    ln -s "$PWD/shared" ../shared && log "linked ../shared -> $PWD/shared"
fi
[ -d ../shared/data ] || log "!! no ../shared/data: tests and benches that read it will fail"

nvidia-smi 2>&1 | tee -a "$LOG"
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("torch", "torchvision", "timm", "transformers", "diffusers", "peft", "typer",
             "rich", "numpy", "tifffile", "opencv-python-headless", "zarr", "dask",
             "distributed", "openslide-python", "safetensors", "huggingface-hub"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
import torch
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
import stainctl.cli.app  # noqa: F401  the CLI imports with the carried wheels
print("import stainctl: ok")
EOF
cp bench/RESULTS.md /tmp/RESULTS.before.md 2>/dev/null

declare -A CMD=(
    [gpu]="python3 bench/gpu.py --device cuda"
    [scale]="python3 bench/scale.py --device cuda"
    [histdist]="python3 bench/translate_histdist.py --device cuda"
    [normalize]="python3 bench/normalize.py --device cuda"
    [demo]="${DEMO_CMD:-STAINCTL_DIRECT_READ=0 sh bench/demo_retrain.sh cuda 2000 16}"
)
declare -A LIMIT=([gpu]=200 [scale]=120 [histdist]=150 [normalize]=120 [demo]=300)
summary=()
for arg in "$@"; do
    name=${arg%%=*}
    limit=${LIMIT[$name]:-120}
    [ "$arg" != "$name" ] && limit=${arg#*=}
    override="PART_CMD_$name"
    cmd=${!override:-${CMD[$name]:-}}
    if [ -z "$cmd" ]; then
        log "!! part $name: no command (unknown part, or demo without DEMO_CMD)"
        summary+=("$name: no command")
        continue
    fi
    log ""
    log "== part $name (timeout ${limit}s): $cmd   [$(( $(date +%s) - start )) s since start]"
    t0=$(date +%s)
    set -o pipefail
    timeout --signal=TERM --kill-after=15 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG"
    rc=$?
    set +o pipefail
    took=$(( $(date +%s) - t0 ))
    case $rc in
        0) state=ok ;;
        124|137) state="TIMED OUT after ${limit}s" ;;
        *) state="FAILED (exit $rc)" ;;
    esac
    log "== part $name: $state in ${took}s"
    summary+=("$name: $state in ${took}s")
done

cp bench/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
if [ -f /tmp/RESULTS.before.md ]; then  # what the parts added (inside their sections)
    diff /tmp/RESULTS.before.md bench/RESULTS.md | sed -n 's/^> //p' >"$OUT/RESULTS.new.md"
fi
log ""
log "== summary ($(( $(date +%s) - start )) s in all)"
for line in "${summary[@]}"; do log "   $line"; done
exit 0
