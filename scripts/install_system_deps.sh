#!/usr/bin/env bash
# Installs the Debian packages reverie's tests need:
#   fonts-noto-color-emoji  the Noto Color Emoji font the "emoji" data set renders
#   unicode-data            emoji-test.txt, the CLDR names used as its captions
#   chromium                the headless browser the playground's Playwright tests drive
#   postgresql              the server the shared-queue tests start (initdb, pg_ctl; on loopback, in a temp folder)
# Idempotent and quiet: does nothing when everything is already there, prints apt's output only when it
# fails.
set -euo pipefail

PACKAGES="fonts-noto-color-emoji unicode-data chromium postgresql"
FONT=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
NAMES=/usr/share/unicode/emoji/emoji-test.txt
CHROMIUM=/usr/bin/chromium
INITDB=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
if [ -f "$FONT" ] && [ -f "$NAMES" ] && [ -x "$CHROMIUM" ] && [ -n "$INITDB" ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_system_deps.sh: need root (or sudo) to apt-get install $PACKAGES" >&2
        exit 1
    fi
fi

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086  # PACKAGES is a word list
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends $PACKAGES; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "install_system_deps.sh: apt-get install $PACKAGES failed" >&2
    exit 1
fi

for f in "$FONT" "$NAMES" "$CHROMIUM"; do
    if [ ! -e "$f" ]; then
        echo "install_system_deps.sh: packages installed but $f is missing" >&2
        exit 1
    fi
done
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "install_system_deps.sh: postgresql installed but no /usr/lib/postgresql/*/bin/initdb" >&2
    exit 1
fi
