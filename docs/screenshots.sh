#!/usr/bin/env bash
# Build the documentation site and take screenshots of the home page, a guide and the config reference with
# headless Chromium (Debian: `apt-get install chromium`).
#
#   docs/screenshots.sh [OUT_DIR]        # default docs/images; MKDOCS=path/to/mkdocs (default .venv/bin/mkdocs)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/images}
mkdocs=${MKDOCS:-.venv/bin/mkdocs}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
    echo "docs/screenshots.sh: no Chromium found; install it (Debian: apt-get install chromium) and run again" >&2
    exit 2
fi
if [ ! -x "$mkdocs" ]; then
    echo "docs/screenshots.sh: $mkdocs not found; install the docs extra (.venv/bin/pip install -c constraints.txt" \
        "-e \".[docs]\") or set MKDOCS" >&2
    exit 2
fi
site=$(mktemp -d)
profile=$(mktemp -d)
trap 'rm -rf "$site" "$profile"' EXIT
"$mkdocs" build --strict --quiet -d "$site"
mkdir -p "$out"
for shot in home:index.html guide:guides/method/index.html config:reference/config/index.html; do
    name=${shot%%:*}
    page=${shot#*:}
    # --no-sandbox: Chromium refuses to run as root otherwise; the page is a local file of this build
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
        --window-size=1440,1000 --virtual-time-budget=5000 --screenshot="$out/$name.png" "file://$site/$page" \
        >/dev/null 2>&1
    [ -s "$out/$name.png" ] || { echo "docs/screenshots.sh: Chromium wrote no $out/$name.png" >&2; exit 1; }
    echo "wrote $out/$name.png"
done
