#!/usr/bin/env bash
# Installs m2clip-fast in editable mode with the pinned torch stack.
# Usage: bash scripts/install.sh [EXTRAS]      e.g. bash scripts/install.sh test
# torch goes in first because the C++ extension is built against it (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

# torchcodec (the test and torchcodec extras) loads FFmpeg's shared libraries (any FFmpeg 4-8) from the system.
# Where they are missing, as root with apt-get (Debian, Ubuntu), install the distribution's; else say so and go on
# (the torchcodec tests then skip).
ffmpeg_libraries() {
    local libs=(avcodec avformat avutil swscale swresample avdevice avfilter) missing=() lib pkg pkgs=()
    for lib in "${libs[@]}"; do
        ldconfig -p 2>/dev/null | grep -q "lib${lib}\.so\." || missing+=("$lib")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "note: FFmpeg libraries missing (${missing[*]}): torchcodec cannot decode until they are installed" >&2
        return 0
    fi
    apt-get update -qq
    for lib in "${missing[@]}"; do  # the versioned runtime package, e.g. libavcodec59 on Debian 12
        pkg=$(apt-cache pkgnames "lib${lib}" | grep -E "^lib${lib}[0-9]+$" | sort -V | tail -n 1)
        [ -n "$pkg" ] && pkgs+=("$pkg")
    done
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}
case ",${extras}," in *,test,*|*,torchcodec,*) ffmpeg_libraries ;; esac

python -m pip install -q -c constraints.txt "torch==2.14.1" "torchvision==0.29.1" "setuptools>=64" wheel
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
python -m pip install -q -c constraints.txt --no-build-isolation -e "$spec"
