#!/bin/sh
# `dicomnode` for the service's administrator (installed as /usr/local/bin/dicomnode by
# `make install-service`): the checkout's dicomnode, run as the service user with the
# service's settings, so that `sudo dicomnode status` or `sudo dicomnode ae add ...` see the
# service's database and files.
set -e
export DICOMNODE_CONFIG="${DICOMNODE_CONFIG:-@ETC@/dicomnode.yaml}"
if [ "$(id -un)" = "@USER@" ]; then
    cd "@STATE@"
    exec "@PREFIX@/.venv/bin/dicomnode" "$@"
fi
if [ "$(id -u)" != 0 ]; then
    echo "dicomnode: run it with sudo (it runs as the service user @USER@)" >&2
    exit 1
fi
cd "@STATE@"
exec runuser -u "@USER@" -- "@PREFIX@/.venv/bin/dicomnode" "$@"
