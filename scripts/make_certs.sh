#!/usr/bin/env bash
# Make the certificates and keys of a Flower deployment: a CA, the SuperLink's TLS certificate
# (for 127.0.0.1 and localhost unless --host is given) and one SuperNode key set per rover.
#
#   scripts/make_certs.sh certs --rovers 2                 # rover_000, rover_001
#   scripts/make_certs.sh certs --rover rover_007          # add a rover; existing keys are kept
#   scripts/make_certs.sh certs --rovers 2 --host 10.0.0.5 --host superlink.local --overwrite
#
# Then register and run: `forest-fl deploy --certs certs ...` (docs/federated.md).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 OUT_DIR [--rovers N] [--rover ID ...] [--host HOST ...] [--days N] [--overwrite]" >&2
    exit 2
fi
out="$1"
shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$python" ]] || python=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m forest_perception.collab.flower.cli certs --out "$out" "$@"
