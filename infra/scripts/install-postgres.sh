#!/usr/bin/env bash
# Installs the system packages the test suite runs itself (`make test` calls this
# before pytest), each only when it is missing:
#   - PostgreSQL: the server binaries (initdb, postgres). tests/servers.py starts a
#     throwaway cluster per test on a free port, so this machine needs the programs,
#     never a running server. Present when initdb is under /usr/lib/postgresql/*/bin
#     or `pg_config --bindir`.
#   - Chromium: Debian's `chromium`, the browser tests/integration/test_serving_page.py
#     drives with Playwright (the tests never run `playwright install`, so no browser
#     is downloaded at run time), and fonts-liberation, a font the page's text renders
#     with (a chromium recommendation that --no-install-recommends leaves out).
#     Present when `chromium` is on PATH or /usr/bin/chromium exists.
#
# Idempotent: exits at once when both are present. Otherwise installs the missing
# Debian packages with apt-get (as root, or through sudo), and keeps them from
# leaving a server behind:
#   - create_main_cluster = false in /etc/postgresql-common/createcluster.conf,
#     set between installing postgresql-common and postgresql, so the postinst
#     creates no `main` cluster (nothing to start, no data in /var/lib/postgresql);
#   - a policy-rc.d that answers 101 ("action forbidden") for the install, so
#     invoke-rc.d and deb-systemd-invoke start no service either (PostgreSQL's, or
#     one that chromium's dependencies bring); one already present (as in Docker
#     images) is put back afterwards.
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

have_chromium() {
  if command -v chromium 2>/dev/null; then
    return 0
  fi
  if [[ -x /usr/bin/chromium ]]; then
    echo /usr/bin/chromium
    return 0
  fi
  return 1
}

die() {
  echo "install-postgres: $*" >&2
  exit 1
}

bindir="$(have_initdb || true)"
chromium="$(have_chromium || true)"
[[ -z "$bindir" ]] || echo "install-postgres: PostgreSQL server binaries already in $bindir"
[[ -z "$chromium" ]] || echo "install-postgres: Chromium already at $chromium"
if [[ -n "$bindir" && -n "$chromium" ]]; then
  exit 0
fi

missing=()
[[ -n "$bindir" ]] || missing+=("postgresql (initdb, postgres)")
[[ -n "$chromium" ]] || missing+=("chromium")
command -v apt-get >/dev/null 2>&1 \
  || die "missing ${missing[*]} and apt-get is missing: install them with this system's package manager"

if [[ "$(id -u)" == 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  die "missing ${missing[*]}; installing Debian packages needs root: run this script as root or install sudo"
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
printf '#!/bin/sh\n# install-postgres.sh: no service starts while the test packages are installed\nexit 101\n' \
  | "${as_root[@]}" tee "$policy" >/dev/null
"${as_root[@]}" chmod 755 "$policy"

apt_get=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Options::=--force-confold)
"${apt_get[@]}" update

if [[ -z "$bindir" ]]; then
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
fi

if [[ -z "$chromium" ]]; then
  "${apt_get[@]}" install --no-install-recommends chromium fonts-liberation

  chromium="$(have_chromium)" || die "installed 'chromium' but found no chromium on PATH or at /usr/bin/chromium"
  echo "install-postgres: Chromium installed at $chromium ($("$chromium" --version 2>/dev/null || echo "version unknown"))"
fi
