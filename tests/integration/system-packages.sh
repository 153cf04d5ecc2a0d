#!/usr/bin/env bash
# make test-integration, first step: the system packages its services need (a one-node Slurm with
# munge, a PostgreSQL server), installed with apt-get where they are missing and this user may.
# Where they cannot be installed this says so and succeeds: the tests that need them then skip,
# each naming what is missing.
set -uo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
    echo "test-integration: cannot install ${need[*]} (needs apt-get as root): their tests will skip" >&2
    exit 0
fi
echo "test-integration: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
    echo "test-integration: apt-get could not install ${need[*]}: their tests will skip" >&2
fi
exit 0
