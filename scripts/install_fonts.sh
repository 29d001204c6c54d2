#!/usr/bin/env bash
# Installs the Noto Color Emoji font that reverie's "emoji" data set renders
# (Debian package fonts-noto-color-emoji). Idempotent and quiet: does nothing
# when the font is already there.
set -euo pipefail

FONT=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
if [ -f "$FONT" ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_fonts.sh: need root (or sudo) to apt-get install fonts-noto-color-emoji" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends fonts-noto-color-emoji >/dev/null

if [ ! -f "$FONT" ]; then
    echo "install_fonts.sh: fonts-noto-color-emoji installed but $FONT is missing" >&2
    exit 1
fi
