#!/bin/sh
# Container entrypoint: prepares the two volumes, then replaces itself with `loraplex serve`.
#
# - The adapter store ($LORAPLEX_ADAPTERS_DIR) is seeded with the image's shipped adapters on first
#   start only, when the folder is completely empty. A marker file then keeps it non-empty, so an
#   adapter a user deleted is never brought back and a user's adapter is never overwritten.
# - The model cache ($LORAPLEX_CACHE_DIR) gets a link to the embedded model converted at build time,
#   so the server finds it there without converting; the link follows the image on upgrades.
# - Every other setting reaches the server as a LORAPLEX_* environment variable; arguments given to
#   `docker run IMAGE ...` are passed on as `loraplex serve` flags.
set -eu

store="${LORAPLEX_ADAPTERS_DIR:-/var/lib/loraplex/adapters}"
cache="${LORAPLEX_CACHE_DIR:-/var/cache/loraplex}"
seed=/opt/loraplex/adapters
embedded=/opt/loraplex/models/SmolLM2-135M-Instruct

mkdir -p "$store" "$cache/models"
if [ -z "$(ls -A "$store")" ]; then
    cp -R "$seed"/. "$store"/
    : > "$store/.seeded-from-image"
    echo "loraplex-entrypoint: seeded the empty adapter store $store with: $(ls "$seed" | tr '\n' ' ')"
fi
link="$cache/models/$(basename "$embedded")"
if [ ! -e "$link" ] && [ ! -L "$link" ]; then
    ln -s "$embedded" "$link"
fi

exec loraplex serve --host "${LORAPLEX_HOST:-0.0.0.0}" "$@"
