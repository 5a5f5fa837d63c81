#!/bin/sh
# Start `d2lora serve`.  Without D2LORA_BASE_DIR the demo model is converted once into the
# models volume (D2LORA_CACHE_DIR) and served.  Extra arguments go to `d2lora serve`.
set -eu

if [ -z "${D2LORA_BASE_DIR:-}" ]; then
    D2LORA_BASE_DIR="$(d2lora models demo)"
    export D2LORA_BASE_DIR
fi

exec d2lora serve --base "$D2LORA_BASE_DIR" "$@"
