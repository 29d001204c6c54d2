#!/usr/bin/env bash
# Installs what reverie's "emoji" data set needs, from Debian's packages:
#   fonts-noto-color-emoji  the Noto Color Emoji font it renders
#   unicode-data            emoji-test.txt, the CLDR names used as captions
# Idempotent and quiet: does nothing when both files are already there, prints
# apt's output only when it fails.
set -euo pipefail

FONT=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
NAMES=/usr/share/unicode/emoji/emoji-test.txt
if [ -f "$FONT" ] && [ -f "$NAMES" ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_fonts.sh: need root (or sudo) to apt-get install fonts-noto-color-emoji unicode-data" >&2
        exit 1
    fi
fi

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends fonts-noto-color-emoji unicode-data; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "install_fonts.sh: apt-get install fonts-noto-color-emoji unicode-data failed" >&2
    exit 1
fi

for f in "$FONT" "$NAMES"; do
    if [ ! -f "$f" ]; then
        echo "install_fonts.sh: packages installed but $f is missing" >&2
        exit 1
    fi
done
