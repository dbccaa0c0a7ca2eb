#!/bin/sh
# What the official postgres image does at start, reduced to what CI uses: on an empty PGDATA, initdb with
# POSTGRES_USER as superuser and POSTGRES_PASSWORD required from any host, create POSTGRES_DB; then run
# PostgreSQL as the postgres user on every address. Arguments go to postgres (e.g. -c name=value).
set -eu
BIN=/usr/lib/postgresql/15/bin
PGDATA=${PGDATA:-/var/lib/postgresql/data}
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
: "${POSTGRES_PASSWORD:?is required, as by the official image}"
export PGDATA

if [ "$(id -u)" = 0 ]; then
    # A fresh named volume belongs to root; the socket folder is where pg_isready (the healthcheck) looks.
    mkdir -p "$PGDATA" /var/run/postgresql
    find "$PGDATA" /var/run/postgresql ! -user postgres -exec chown postgres:postgres {} +
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    "$BIN/initdb" --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 \
        --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    # initdb admits only localhost over TCP; the other containers connect from the compose network.
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        # No TCP and a private socket meanwhile: neither the healthcheck nor a client sees this server.
        socket=$(mktemp -d)
        "$BIN/pg_ctl" --wait --silent -o "-c listen_addresses='' -k $socket" start
        "$BIN/psql" --host="$socket" --username="$POSTGRES_USER" --dbname=postgres --quiet \
            --set=ON_ERROR_STOP=1 --command="CREATE DATABASE \"$POSTGRES_DB\""
        "$BIN/pg_ctl" --wait --silent --mode=fast stop
        rmdir "$socket"
    fi
    echo "postgres-entrypoint: initialised $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
fi
exec "$BIN/postgres" -c listen_addresses='*' "$@"
