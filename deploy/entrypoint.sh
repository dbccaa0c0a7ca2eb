#!/bin/sh
# The container starts as root only to make the mounted model cache writable for the service user (a host
# folder may belong to root or to another uid), then runs the service as that user: the model never runs as
# root. Started with --user already, it runs the command as it is. The adapter mount is never touched.
set -eu
APP_UID=${APP_UID:-1000}
if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi
# Hand a folder to the service user: the model cache and the SQLite job store's folder may be host folders or
# fresh volumes owned by root.
own() {
    mkdir -p "$1"
    # Only when something in it is not the service user's: a warm cache of many GB is not walked every start.
    if [ -n "$(find "$1" ! -user "$APP_UID" -print -quit 2>/dev/null)" ]; then
        if ! chown -R "$APP_UID:$APP_UID" "$1" 2>/dev/null; then
            echo "entrypoint: could not give $1 to uid $APP_UID (a read-only mount?); writing into it will fail" >&2
        fi
    fi
}
own "${HF_HOME:-/root/.cache/huggingface}"
case "${JOBS_DB:-/app/jobs/jobs.sqlite3}" in
    *://*) ;;  # a database server (postgresql://…): no folder of ours holds the jobs
    *) own "$(dirname "${JOBS_DB:-/app/jobs/jobs.sqlite3}")" ;;
esac
exec setpriv --reuid="$APP_UID" --regid="$APP_UID" --clear-groups --inh-caps=-all --bounding-set=-all \
    --no-new-privs -- "$@"
