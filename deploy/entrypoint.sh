#!/bin/sh
# The container starts as root only to make the mounted model cache writable for the service user (a host
# folder may belong to root or to another uid), then runs the service as that user: the model never runs as
# root. Started with --user already, it runs the command as it is. The adapter mount is never touched.
set -eu
APP_UID=${APP_UID:-1000}
if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi
# The model cache and the job store's folder: both may be host folders or fresh volumes owned by root.
for folder in "${HF_HOME:-/root/.cache/huggingface}" "$(dirname "${JOBS_DB:-/app/jobs/jobs.sqlite3}")"; do
    mkdir -p "$folder"
    # Only when something in it is not the service user's: a warm cache of many GB is not walked every start.
    if [ -n "$(find "$folder" ! -user "$APP_UID" -print -quit 2>/dev/null)" ]; then
        if ! chown -R "$APP_UID:$APP_UID" "$folder" 2>/dev/null; then
            echo "entrypoint: could not give $folder to uid $APP_UID (a read-only mount?); writing into it will fail" >&2
        fi
    fi
done
exec setpriv --reuid="$APP_UID" --regid="$APP_UID" --clear-groups --inh-caps=-all --bounding-set=-all \
    --no-new-privs -- "$@"
