#!/usr/bin/env bash
# install.sh: install, configure and remove webknock on Debian (server and client).
# `install.sh --help` and `install.sh COMMAND --help` describe everything it does.
#
# This script only bootstraps: it makes sure Debian's python3 (with venv support) is
# there, then hands over to the installer in the package, webknock/install/ (run from
# this source tree with that python), which installs everything else. `install.sh demo`
# runs ./demo.
set -euo pipefail
umask 022

PROG=install.sh
SRC=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
SYSTEM_PYTHON=${WEBKNOCK_SYSTEM_PYTHON:-/usr/bin/python3}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

# apt_allowed ARGS...: this run may install Debian packages (root, no --no-apt/--root).
apt_allowed() {
    local a
    [ "$(id -u)" = 0 ] || return 1
    [ "$SYSTEM_PYTHON" = /usr/bin/python3 ] || return 1
    for a in "$@"; do
        case $a in --no-apt | --root | --root=* | -h | --help) return 1 ;; esac
    done
    return 0
}

# needs_venv COMMAND: the command builds a venv (python3-venv).
needs_venv() {
    case ${1:-} in server | client) return 0 ;; *) return 1 ;; esac
}

has_venv() { "$SYSTEM_PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; }

bootstrap() {
    local missing=()
    if [ ! -x "$SYSTEM_PYTHON" ]; then
        missing+=(python3 python3-venv)
    elif needs_venv "${1:-}" && ! has_venv; then
        missing+=(python3-venv)
    fi
    [ ${#missing[@]} -gt 0 ] || return 0
    if ! apt_allowed "$@"; then
        # the installer itself says what is missing when it needs a venv
        [ -x "$SYSTEM_PYTHON" ] || die "$SYSTEM_PYTHON not found (apt-get install python3)"
        return 0
    fi
    printf '==> installing Debian packages: %s\n' "${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

case ${1:-} in
    demo)
        shift
        exec "$SRC/demo" "$@"
        ;;
esac

bootstrap "$@"
[ -f "$SRC/webknock/install/cli.py" ] || die "$SRC is not a webknock source tree"
# -I: no $PYTHON* variables, no user site, no cwd on the path; -B: no bytecode in the tree.
export WEBKNOCK_SYSTEM_PYTHON="$SYSTEM_PYTHON"
exec "$SYSTEM_PYTHON" -I -B -c '
import sys
sys.path.insert(0, sys.argv.pop(1))
from webknock.install.cli import main
sys.exit(main())
' "$SRC" "$@"
