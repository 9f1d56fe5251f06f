#!/bin/sh
# Elastic host discovery for horovodrun: print one "host:slots" line per usable host.
# horovodrun calls this repeatedly while the job runs, so hosts can come and go.
# Source, first found: the file named by RINGFLOW_HOSTS_FILE (one host:slots per line, editable
# while a job runs), else RINGFLOW_HOSTS ("host1:2,host2:2", set by tasks/train.py from
# training.horovod.hosts), else this machine with one slot per core.
if [ -n "$RINGFLOW_HOSTS_FILE" ] && [ -f "$RINGFLOW_HOSTS_FILE" ]; then
    grep -v '^[[:space:]]*\(#\|$\)' "$RINGFLOW_HOSTS_FILE"
elif [ -n "$RINGFLOW_HOSTS" ]; then
    echo "$RINGFLOW_HOSTS" | tr ',' '\n'
else
    echo "localhost:$(nproc)"
fi
