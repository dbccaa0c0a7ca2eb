#!/bin/sh
# The container starts as root only to make the mounted model cache writable for the service user (a host
# folder may belong to root or to another uid), then runs the service as that user: the model never runs as
# root. Started with --user already, it runs the command as it is. The adapter mount is never touched.
set -eu
APP_UID=${APP_UID:-1000}
if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi
cache=${HF_HOME:-/root/.cache/huggingface}
mkdir -p "$cache"
# Only when something in it is not the service user's: a warm cache of many GB is not walked on every start.
if [ -n "$(find "$cache" ! -user "$APP_UID" -print -quit 2>/dev/null)" ]; then
    if ! chown -R "$APP_UID:$APP_UID" "$cache" 2>/dev/null; then
        echo "entrypoint: could not give $cache to uid $APP_UID (a read-only mount?); downloads into it will fail" >&2
    fi
fi
exec setpriv --reuid="$APP_UID" --regid="$APP_UID" --clear-groups --inh-caps=-all --bounding-set=-all \
    --no-new-privs -- "$@"
