#!/usr/bin/env bash
# Prepare here (PyPI reachable) what scripts/device_flash_attn.sh builds on the GPU host:
# flash-attn's source distribution (CUTLASS included, ~8 MB) into .whl-flash/. pip cannot
# download it without building its metadata (which needs torch and nvcc), so it is fetched
# by its PyPI JSON entry. Then:
#   run: carry [".whl-flash"], command "bash scripts/device_flash_attn.sh build"
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${FLASH_ATTN_VERSION:-2.8.3.post2}
mkdir -p .whl-flash
index="https://pypi.org/pypi/flash-attn/json"
# The release's sdist (a mirror may give its address relative to the index entry).
url=$(curl -fsSL "$index" | python3 -c '
import json, sys, urllib.parse
files = json.load(sys.stdin)["releases"][sys.argv[2]]
url = next(f["url"] for f in files if f["packagetype"] == "sdist")
print(urllib.parse.urljoin(sys.argv[1], url))' "$index" "$VERSION")
curl -fsSL -o ".whl-flash/flash_attn-$VERSION.tar.gz" "$url"
ls -la .whl-flash
