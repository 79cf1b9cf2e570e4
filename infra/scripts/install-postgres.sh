#!/usr/bin/env bash
# Installs the PostgreSQL server binaries (initdb, postgres) that the integration
# tests run themselves: tests/servers.py starts a throwaway cluster per test on a
# free port, so this machine needs the programs, never a running server.
#
# Idempotent: exits at once when initdb is under /usr/lib/postgresql/*/bin or
# `pg_config --bindir`. Otherwise installs the Debian package `postgresql` with
# apt-get (as root, or through sudo), and keeps the package from leaving a server
# behind:
#   - create_main_cluster = false in /etc/postgresql-common/createcluster.conf,
#     set between installing postgresql-common and postgresql, so the postinst
#     creates no `main` cluster (nothing to start, no data in /var/lib/postgresql);
#   - a policy-rc.d that answers 101 ("action forbidden") for the install, so
#     invoke-rc.d and deb-systemd-invoke start no service either; one already
#     present (as in Docker images) is put back afterwards.
set -euo pipefail

have_initdb() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    if [[ -x "$dir/initdb" ]]; then
      echo "$dir"
      return 0
    fi
  done
  if command -v pg_config >/dev/null 2>&1; then
    dir="$(pg_config --bindir 2>/dev/null || true)"
    if [[ -n "$dir" && -x "$dir/initdb" ]]; then
      echo "$dir"
      return 0
    fi
  fi
  return 1
}

die() {
  echo "install-postgres: $*" >&2
  exit 1
}

if bindir="$(have_initdb)"; then
  echo "install-postgres: PostgreSQL server binaries already in $bindir"
  exit 0
fi

command -v apt-get >/dev/null 2>&1 \
  || die "initdb not found and apt-get is missing: install the PostgreSQL server package (initdb, postgres) with this system's package manager"

if [[ "$(id -u)" == 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  die "initdb not found; installing the 'postgresql' package needs root: run this script as root or install sudo"
fi

policy=/usr/sbin/policy-rc.d
backup="$policy.install-postgres-backup"
restore_policy() {
  if [[ -e "$backup" ]]; then
    "${as_root[@]}" mv -f "$backup" "$policy"
  else
    "${as_root[@]}" rm -f "$policy"
  fi
}
if [[ -e "$policy" ]]; then
  "${as_root[@]}" cp -p "$policy" "$backup"
fi
trap restore_policy EXIT
printf '#!/bin/sh\n# install-postgres.sh: no service starts while PostgreSQL is installed\nexit 101\n' \
  | "${as_root[@]}" tee "$policy" >/dev/null
"${as_root[@]}" chmod 755 "$policy"

apt_get=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Options::=--force-confold)
"${apt_get[@]}" update
"${apt_get[@]}" install --no-install-recommends postgresql-common

conf=/etc/postgresql-common/createcluster.conf
if grep -Eq '^[#[:space:]]*create_main_cluster' "$conf"; then
  "${as_root[@]}" sed -Ei 's/^[#[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' "$conf"
else
  echo "create_main_cluster = false" | "${as_root[@]}" tee -a "$conf" >/dev/null
fi

"${apt_get[@]}" install --no-install-recommends postgresql

bindir="$(have_initdb)" || die "installed 'postgresql' but found no initdb under /usr/lib/postgresql/*/bin"
echo "install-postgres: PostgreSQL server binaries installed in $bindir (no cluster created, no service started)"
