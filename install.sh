#!/usr/bin/env bash
# install.sh: install, configure and remove webknock on Debian (server and client).
# `install.sh --help` and `install.sh COMMAND --help` describe everything it does.
set -euo pipefail
umask 022

PROG=install.sh
SRC=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
SYSTEM_PYTHON=${WEBKNOCK_SYSTEM_PYTHON:-/usr/bin/python3}
NAME_RE='^[A-Za-z0-9][A-Za-z0-9_-]{0,15}$'
PATH_RE='^/[A-Za-z0-9._/+-]*$'
URL_RE='^https?://[^[:space:]/?#]+/[^[:space:]#]+$' # as [server] url accepts it, with a path
CLIENT_LIST=.install.sh-profiles
WORK="" # scratch directory of this run, removed on exit

cleanup() {
    [ -z "$WORK" ] || rm -rf -- "$WORK"
}
trap cleanup EXIT
trap 'echo "$PROG: interrupted" >&2; exit 130' INT
trap 'echo "$PROG: terminated" >&2; exit 143' TERM

# -- messages ------------------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
step() { printf '==> %s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}
usage_error() {
    printf '%s: %s (see %s --help)\n' "$PROG" "$*" "$PROG" >&2
    exit 2
}
indent() { sed 's/^/    /'; }

# -- help ----------------------------------------------------------------------------------

help_main() {
    cat <<'EOF'
Usage: install.sh COMMAND [OPTIONS]

Install, configure and remove webknock, the web-knocking firewall service, on
Debian. Run it as root from a copy of the webknock source tree.

Commands:
  server      install or update the server (venv, CGI, webknockd, config, server
              key, spool, cron, systemd unit), start webknockd and print how to
              enrol clients; safe to re-run (keeps keys and config); --v1 also
              makes the shared v1 keys, for the original PHP clients
  client      install the client command `webknock` and a profile: the one
              `webknockctl client add` printed (v2: makes this client's key and
              prints what to send to the admin), or the v1 blob; --keygen-only
              makes the key first, before the admin enrols it
  profile     print the v1 client profile (the shared keys) of an installed
              server instance again (an instance installed with --v1)
  uninstall   remove what `server` (or `client`) installed, incl. the firewall chain
  demo        run ./demo: a complete knock in throwaway network namespaces

`install.sh COMMAND --help` lists the options of each command.

Exit status: 0 done, 1 failed (the message says what to fix), 2 usage error,
130 interrupted.
EOF
}

help_server() {
    cat <<'EOF'
Usage: install.sh server [OPTIONS]

Install or update a webknock server instance. Without options on a terminal it
asks for the settings; with options, --yes, or no terminal it never asks.

What it does (PREFIX is empty, or DIR with --root DIR):
  * apt-get installs missing packages: python3-venv, the firewall tools of the
    backend (iptables, nftables + python3-nftables, ipset), and nginx + fcgiwrap
    or apache2 for --web-server
  * PREFIX/opt/webknock/venv: a venv made from /usr/bin/python3 with
    --system-site-packages, webknock and its pinned dependencies
    (requirements.txt), byte-compiled (the web user cannot write __pycache__)
  * PREFIX/opt/webknock/cgi-bin/webknock.cgi, PREFIX/usr/local/sbin/webknockd and
    webknockctl: entry points running the venv's python
  * PREFIX/etc/webknock/INSTANCE.server-key: the protocol v2 server key
    (Ed25519, signs every reply; its public half pins the server in each
    client's profile), root:root 0600, made once and kept
  * PREFIX/etc/webknock/INSTANCE.ini (0644): the instance config, with the knock
    URL (url =, printed in the profiles `webknockctl client add` makes) - an
    existing one is kept; every setting:
    PREFIX/opt/webknock/share/webknock.ini.example
  * only with --v1 (or an instance that has v1 already):
    PREFIX/etc/webknock/INSTANCE.keys, the shared v1 keys, fresh from the OS
    CSPRNG, root:root 0600 (only webknockd reads them), named by keys_file in
    the config - an existing keys file is kept byte for byte, and an older
    0640 root:<web group> one is tightened
  * PREFIX/run/webknock/INSTANCE: the spool, on a tmpfs of its own (bounded in size
    and entries; not mounted under --root; the unit's ExecStartPre
    `webknockctl prepare-spool` mounts it again after a reboot),
    PREFIX/var/lib/webknock (state, 0700), PREFIX/var/log/webknock
  * PREFIX/etc/cron.d/webknock: `webknockctl reap` every minute, one line per
    instance (fallback while webknockd is down)
  * PREFIX/etc/systemd/system/webknockd@.service: hardened unit; enabled and
    (re)started as webknockd@INSTANCE where systemd runs, else webknockd is
    started directly (setsid, same capability bounding set, log in
    /var/log/webknock/INSTANCE.log, pid in /run/webknock/INSTANCE.pid)
  * with protect = yes: first grants the address of your SSH session
    ($SSH_CLIENT or $SSH_CONNECTION) on the SSH port, and says so; established
    connections never drop
  * --cgi-dir: copies the CGI there; else writes the nginx+fcgiwrap or Apache
    snippet to PREFIX/etc/webknock/{nginx,apache}-INSTANCE.conf and prints it
  * prints how to enrol clients (protocol v2, one key per client): the client
    runs `install.sh client --profile NAME --keygen-only` and sends its public
    key; you run `webknockctl client add NAME --key 'wk2:...'`, which prints the
    profile the client pastes into `install.sh client --profile NAME`
  * with v1 on: also the v1 client profile (URL, ports, time and the shared
    secret keys) to paste into `install.sh client` on each v1 client

Options:
  --instance NAME     instance name (default webknock): letters, digits, _ or -,
                      at most 16; other instances get /etc/webknock/NAME.ini,
                      chain WK-NAME, URL path /webknock-NAME, unit webknockd@NAME
  --tcp-ports LIST    TCP ports clients may open, e.g. 22,2222 (default 22)
  --udp-ports LIST    UDP ports clients may open, e.g. 51820 (default none)
  --max-time SECONDS  longest grant, at most 604800 (default 3600)
  --backend NAME      auto, iptables or nftables (default auto)
  --protect yes|no    yes: close the offered ports to everyone without a grant
                      (default no: your own firewall must drop them)
  --web-user USER     user the web server runs CGIs as (default www-data)
  --web-server NAME   nginx (with fcgiwrap), apache or none (default: the one
                      installed, else nginx); none installs no web server
  --cgi-dir DIR       also copy the CGI into DIR (e.g. /usr/lib/cgi-bin), with
                      this instance's config built in
  --url URL           knock URL for the client profiles, written to the config
                      as url = (default https://<hostname -f>/webknock[-NAME])
  --v1                also speak protocol v1 (shared keys): only for sites that
                      keep the original PHP clients or v1 profiles. Makes
                      INSTANCE.keys, sets keys_file and prints the v1 profile.
                      Without it a new instance speaks v2 only; an instance
                      that has v1 keeps it (a re-run never turns v1 off), and
                      --v1 on an instance without v1 adds it
  --root DIR          install below DIR instead of / (for tests and packaging):
                      every path is prefixed and written into the files; implies
                      --no-apt and --no-start and never touches the firewall
  --no-apt            do not install Debian packages (fail if one is missing)
  --no-start          do not start or restart webknockd
  -y, --yes           do not ask; use the options and defaults
  -h, --help          this text

Re-running is safe: keys and config are kept (a differing option is reported,
not applied: edit the config; only --v1 adds keys_file to a config without
it), the code is updated and webknockd restarted.
EOF
}

help_client() {
    cat <<'EOF'
Usage: install.sh client [OPTIONS]
       install.sh client --keygen-only [--profile NAME] [OPTIONS]

Install the webknock client and one profile. As root: venv in
PREFIX/opt/webknock-client/venv (webknock + requests, pinned), the command
PREFIX/usr/local/bin/webknock and the profile
PREFIX/etc/webknock/client.d/NAME.ini.
As another user: ~/.local/share/webknock-client, ~/.local/bin/webknock and
~/.config/webknock/NAME.ini.

The profile is one of:
  * protocol v2 (one key per client): the profile `webknockctl client add`
    printed on the server ([client] with url, server_key, ports). It is written
    with key_file = NAME.key; this client's private key NAME.key (0600, never
    leaves this host) is made with `webknock keygen`, or kept when it exists.
    install.sh prints the public key and the command to send to the server's
    admin (webknockctl client add NAME --key '...'), unless the profile says
    the admin enrolled this very key already.
  * protocol v1 (shared keys, e.g. the original PHP server): the blob
    `install.sh server --v1` printed (from its -----BEGIN WEBKNOCK CLIENT
    PROFILE----- line to its -----END ...----- line); the keys go to NAME.keys
    (0600).
A profile with both the v1 keys and a server_key, or with neither, is refused.

The usual v2 order: `install.sh client --profile NAME --keygen-only` makes the
key and prints the public key to send; the admin enrols it and sends back the
profile; `install.sh client --profile NAME --no-venv` installs it.
Then: webknock --profile NAME knock   (see webknock --help)

On a terminal, paste the profile: reading stops by itself after its last line
(the END line, or the profile's ports line), or press Ctrl-D. Without a
terminal, pass it with --from FILE, or on stdin (--from -, or a pipe).

Options:
  --profile NAME      profile name (default: default)
  --from FILE|-       read the profile from FILE or stdin
  --keygen-only       read no profile: make this client's v2 key NAME.key (or
                      show the existing one) and print what to send to the admin
  --url URL           use this knock URL instead of the profile's
  --root DIR          install below DIR (implies --no-apt)
  --no-apt            do not install Debian packages
  --no-venv           only write the profile (the client is already installed)
  -y, --yes           do not ask
  -h, --help          this text
EOF
}

help_profile() {
    cat <<'EOF'
Usage: install.sh profile [--instance NAME] [--url URL] [--root DIR]

Print the v1 client profile of an installed server instance again: knock URL,
ports, time and the shared secret keys (an instance with v1 on: installed with
--v1). Paste it into `install.sh client` on a client, over a private channel
only. v2 clients get their profile from `webknockctl client add`.
EOF
}

help_uninstall() {
    cat <<'EOF'
Usage: install.sh uninstall [--instance NAME | --all] [--purge] [--root DIR]
       install.sh uninstall --client [--purge] [--root DIR]

Remove a server instance: stop webknockd (systemd unit or the directly started
daemon), remove its firewall chain/table (webknockctl teardown), its cron line,
CGI copies, web-server snippet and spool. Keys, config, state file and log are
kept unless --purge (it says which). When no instance is left, the shared parts
go too: venv, /usr/local/sbin/webknockd and webknockctl, the systemd unit and
/etc/cron.d/webknock. Each step can be re-run: a failed uninstall stops before
it removes what a re-run needs.

Options:
  --instance NAME   the instance to remove (default webknock)
  --all             every installed instance
  --purge           also delete keys, config, state and log files
  --client          remove the client instead (venv, `webknock`; --purge also
                    the profiles, v1 keys files and v2 private keys (NAME.key)
                    install.sh client wrote)
  --root DIR        remove an installation made with --root DIR (nothing is
                    stopped, the firewall is not touched)
  -y, --yes         do not ask
  -h, --help        this text
EOF
}

# -- small helpers -------------------------------------------------------------------------

need_root() {
    [ "$(id -u)" = 0 ] || die "run as root (e.g. sudo $0 $*)"
}

on_terminal() { [ -t 0 ] && [ "$YES" = 0 ]; }

ask() { # ask VAR "question" default
    local var=$1 question=$2 default=$3 answer
    read -r -p "$question [$default]: " answer || true
    printf -v "$var" '%s' "${answer:-$default}"
}

systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

check_root_dir() {
    [ -n "$ROOT" ] || return 0
    [[ $ROOT =~ $PATH_RE ]] || usage_error "--root: $ROOT must be an absolute path of letters, digits and ._/+-"
    ROOT=${ROOT%/}
    [ -n "$ROOT" ] || usage_error "--root /: that is the real system; leave --root out"
    mkdir -p -- "$ROOT"
}

norm_ports() { # "22, 2222 80" -> "22, 2222, 80"; empty stays empty; dies on junk
    local what=$1 text=$2 out=() p
    text=${text//,/ }
    for p in $text; do
        if ! [[ $p =~ ^[0-9]{1,5}$ ]] || [ "$p" -lt 1 ] || [ "$p" -gt 65535 ]; then
            usage_error "$what: $p is not a port from 1 to 65535"
        fi
        out+=("$((10#$p))")
    done
    local IFS=,
    text="${out[*]}"
    printf '%s' "${text//,/, }"
}

ini_value() { # ini_value FILE KEY: first "key = value" anywhere (rough; for apt decisions only)
    sed -n "s/^[[:space:]]*$2[[:space:]]*=[[:space:]]*\([^#;]*\).*/\1/p" "$1" 2>/dev/null \
        | head -n1 | sed 's/[[:space:]]*$//'
}

apt_install() { # apt_install PKG...: install the missing ones
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    if [ "$NO_APT" = 1 ]; then
        warn "missing Debian packages (not installed: --no-apt/--root): ${missing[*]}"
        return 0
    fi
    step "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}


# Run python code with a venv's interpreter: isolated (-I: no cwd or $PYTHON* on the path,
# so the source tree never shadows the installed package), without writing bytecode.
pyrun() {
    local python=$1 code=$2
    shift 2
    "$python" -I -B -c "$code" "$@"
}

install_file() { # install_file MODE SRC DEST: atomic copy (temp + rename)
    local mode=$1 src=$2 dest=$3 tmp
    tmp=$(mktemp "$(dirname -- "$dest")/.webknock.XXXXXX")
    cat -- "$src" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f -- "$tmp" "$dest"
}

write_file() { # write_file MODE DEST < content
    local mode=$1 dest=$2 tmp
    tmp=$(mktemp "$(dirname -- "$dest")/.webknock.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    mv -f -- "$tmp" "$dest"
}

# install_shim SRC DEST PYTHON [CONFIG]: an entry point with its #! line set to PYTHON,
# the interpreter's flags kept (the CGI's -IS), and, for CGI copies outside the snippet's
# reach, its config built in.
install_shim() {
    local src=$1 dest=$2 python=$3 config=${4:-} first flags=
    first=$(head -n1 -- "$src")
    [ "${first:0:2}" = '#!' ] || die "$src: expected a #! line"
    case $first in *' '*) flags=" ${first#* }" ;; esac
    {
        printf '#!%s%s\n' "$python" "$flags"
        if [ -n "$config" ]; then
            awk -v cfg="$config" '
                NR == 1 { next }
                /^import os$/ { has_os = 1 }
                /^from webknock\.cgi import main/ && has_os {
                    printf "os.environ.setdefault(\"WEBKNOCK_CONFIG\", \"%s\")  # install.sh --cgi-dir\n", cfg
                    found = 1
                }
                { print }
                END { if (!found) exit 1 }' "$src" || die "$src: cannot find its import line"
        else
            tail -n +2 -- "$src"
        fi
    } | write_file 0755 "$dest"
}

is_our_shim() { # is_our_shim FILE PYTHON: a file install_shim wrote for this venv
    local first
    [ -f "$1" ] && [ ! -L "$1" ] || return 1
    first=$(head -n1 -- "$1")
    [ "$first" = "#!$2" ] || [ "${first#"#!$2 "}" != "$first" ]
}

# -- paths ---------------------------------------------------------------------------------

set_paths() {
    OPT=$ROOT/opt/webknock
    VENV=$OPT/venv
    PY=$VENV/bin/python3
    CGI=$OPT/cgi-bin/webknock.cgi
    SHARE=$OPT/share
    MANIFESTS=$OPT/instances
    SBIN=$ROOT/usr/local/sbin
    ETC=$ROOT/etc/webknock
    RUN_DIR=$ROOT/run/webknock  # pid files of directly started daemons
    SPOOL_BASE=$RUN_DIR  # tmpfs: no disk journal on the path of a knock
    STATE_DIR=$ROOT/var/lib/webknock
    LOG_DIR=$ROOT/var/log/webknock
    CRON_FILE=$ROOT/etc/cron.d/webknock
    LOGROTATE=$ROOT/etc/logrotate.d/webknock
    UNIT=$ROOT/etc/systemd/system/webknockd@.service
}

instance_paths() { # instance_paths NAME
    INSTANCE=$1
    CONFIG=$ETC/$INSTANCE.ini
    KEYS=$ETC/$INSTANCE.keys
    MANIFEST=$MANIFESTS/$INSTANCE
    UNIT_NAME=webknockd@$INSTANCE.service
    DAEMON_LOG=$LOG_DIR/$INSTANCE.log
    PIDFILE=$RUN_DIR/$INSTANCE.pid
}

# -- python snippets (run with the venv's python) ------------------------------------------

# shellcheck disable=SC2016 # python code, not shell
PY_GENKEYS='
import sys
from webknock.keys import format_keys
from webknock.protocol.v1 import Keys
sys.stdout.write(format_keys(Keys.generate()))
'

PY_SERVERKEY='
import sys
from pathlib import Path
from webknock.config import load
from webknock.keys import create_server_key, load_server_key
cfg = load(sys.argv[1])
path = cfg.server_key_file
if path.exists():
    key, state = load_server_key(path), "kept"
else:
    key, state = create_server_key(path), "new"
print(f"{state} {key.public_text()}")
'

PY_CHECKKEYS='
import sys
from webknock.keys import KeysError, load_keys
try:
    load_keys(__import__("pathlib").Path(sys.argv[1]))
except KeysError as exc:
    sys.exit(str(exc))
'

# Print the settings install.sh needs as KEY=VALUE lines (validates the whole file).
PY_CONFIG='
import sys
from webknock.config import ConfigError, load
try:
    cfg = load(sys.argv[1])
except ConfigError as exc:
    sys.exit(str(exc))
print(f"instance={cfg.instance}")
print("tcp_ports=" + ", ".join(map(str, sorted(cfg.tcp_ports))))
print("udp_ports=" + ", ".join(map(str, sorted(cfg.udp_ports))))
print(f"max_time={cfg.max_time}")
print("keys_file=" + str(cfg.keys_file or ""))
print(f"server_key_file={cfg.server_key_file}")
print(f"clients_dir={cfg.clients_dir}")
print(f"spool_dir={cfg.spool_dir}")
print(f"state_file={cfg.state_file}")
print(f"backend={cfg.backend}")
print(f"web_user={cfg.web_user}")
print("protect=" + ("yes" if cfg.protect else "no"))
print("audit_log=" + str(cfg.audit_log or ""))
print(f"url={cfg.url}")
'

PY_SPOOL='
import sys
from pathlib import Path
from webknock.config import SpoolPaths
from webknock.spool.mount import mount_spool, prepare_spool
paths, gid = SpoolPaths(Path(sys.argv[1])), int(sys.argv[2])
if sys.argv[3] == "mount" and not mount_spool(paths, gid):
    print(f"warning: {paths.root} is not on a tmpfs of its own", file=sys.stderr)
prepare_spool(paths, gid)
'

PY_DAEMON_PID='
import sys
from webknock.config import load
from webknock.server.daemon import daemon_running
pid = daemon_running(load(sys.argv[1]))
if pid:
    print(pid)
'

PY_PROFILE='
import sys, socket
from pathlib import Path
from webknock.config import load
from webknock.keys import load_keys
cfg = load(sys.argv[1])
if cfg.keys_file is None:
    sys.exit(f"instance {cfg.instance} speaks protocol v2 only (no keys_file in {cfg.source}): "
             "enrol each client with webknockctl client add, which prints its profile; "
             "for v1 clients re-run install.sh server --v1")
keys = load_keys(cfg.keys_file)
url = sys.argv[2] or cfg.url
if not url:
    sys.exit(f"no knock URL recorded for instance {cfg.instance}: give --url")
ports = [f"tcp/{p}" for p in sorted(cfg.tcp_ports)] + [f"udp/{p}" for p in sorted(cfg.udp_ports)]
print("-----BEGIN WEBKNOCK CLIENT PROFILE-----")
print(f"# instance {cfg.instance} on {socket.gethostname()}: contains the secret keys,")
print("# copy it over a private channel only. Use: install.sh client --profile NAME")
print("[client]")
print(f"url = {url}")
print("ports = " + ", ".join(ports))
print(f"time = {cfg.max_time}")
print("[v1]")
for name, value in keys.to_hex().items():
    print(f"{name} = {value}")
print("-----END WEBKNOCK CLIENT PROFILE-----")
'

# argv: profile-path keys-path mode url-override kind (v1: the blob of install.sh server --v1,
# v2: the profile of webknockctl client add); the text on stdin. Writes the profile (and for
# v1 the keys), checked by the client's own loader; prints url=, client=, instance=, kid=.
PY_CLIENT_PROFILE='
import configparser, os, re, sys
from pathlib import Path
from webknock.client.errors import ConfigError
from webknock.client.profile import load_profile
from webknock.keys import format_keys
from webknock.protocol import v2
from webknock.protocol.v1 import Keys
profile, keys_path, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3], 8)
url_override, kind = sys.argv[4], sys.argv[5]
lines = sys.stdin.read().splitlines()
begin = [i for i, ln in enumerate(lines) if ln.strip() == "-----BEGIN WEBKNOCK CLIENT PROFILE-----"]
end = [i for i, ln in enumerate(lines) if ln.strip() == "-----END WEBKNOCK CLIENT PROFILE-----"]
if begin and end and end[-1] > begin[-1]:
    lines = lines[begin[-1] + 1 : end[-1]]
lines = [ln.strip() for ln in lines]
# "# webknock profile: client NAME of instance INSTANCE (key id HEX)", from client add
enrolled = None
for ln in lines:
    enrolled = enrolled or re.match(
        r"#\s*webknock profile: client (\S+) of instance (\S+) \(key id ([0-9a-f]{16})\)", ln)
# What came before the first section (a prompt, a notice) is not part of the profile.
first = next((i for i, ln in enumerate(lines) if ln.startswith("[")), 0)
parser = configparser.ConfigParser(interpolation=None)
try:
    parser.read_string("\n".join(lines[first:]), source="profile")
    url = url_override or parser.get("client", "url", fallback="").strip()
    ports = parser.get("client", "ports").strip()
    seconds = parser.get("client", "time", fallback="").strip()
    extra = {k: parser.get("client", k, fallback="").strip() for k in ("verify", "timeout", "family")}
    if kind == "v1":
        keys = Keys.from_hex(dict(parser.items("v1")))
    else:
        server_key = parser.get("client", "server_key").strip()
except (configparser.Error, ValueError) as exc:
    sys.exit(f"profile blob: {str(exc).splitlines()[0]}")
if not url:
    print("profile: it has no url (the server has no [server] url): pass the knock URL "
          "with --url https://HOST/PATH", file=sys.stderr)
    sys.exit(2)
if not re.fullmatch(r"https?://[^\s/]+/\S*", url):
    sys.exit(f"profile blob: url {url!r} is not an http(s) URL")
if not re.fullmatch(r"(tcp|udp)/\d{1,5}(\s*,\s*(tcp|udp)/\d{1,5})*", ports):
    sys.exit(f"profile blob: ports {ports!r} is not a list like tcp/22, udp/51820")
if seconds and not seconds.isdigit():
    sys.exit(f"profile blob: time {seconds!r} is not a number of seconds")
if kind == "v2":
    try:
        v2.parse_public_key(server_key)
    except v2.V2Error as exc:
        sys.exit(f"profile blob: server_key {server_key[:60]!r} is not a v2 public key: {exc}")
def write(path, text, mode):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(text)
    return tmp
name = profile.stem
text = [f"# webknock client profile {name} (protocol {kind}), written by install.sh client."]
if enrolled and kind == "v2":
    text.append(f"# Enrolled as client {enrolled[1]} of instance {enrolled[2]} (key id {enrolled[3]}).")
text += [f"# Use: webknock --profile {name} knock|keep|exec -- CMD|info (see webknock --help)",
         "[client]", f"url = {url}"]
if kind == "v1":
    text.append(f"keys_file = {keys_path}")
else:
    text += [f"server_key = {server_key}",
             "# the private key of this client (made by webknock keygen; it never leaves this host)",
             f"key_file = {name}.key"]
text.append(f"ports = {ports}")
if seconds:
    text.append(f"time = {seconds}")
defaults = {"verify": "yes       # check the server certificate (https)",
            "timeout": "10       # seconds per request",
            "family": "...       # address family to knock from: see webknock --help"}
for key, value in extra.items():
    text.append(f"{key} = {value}" if value else f"# {key} = {defaults[key]}")
tmp = write(profile, "\n".join(text) + "\n", mode)
try:
    load_profile(tmp, name)
except ConfigError as exc:
    os.unlink(tmp)
    sys.exit(f"profile blob: {str(exc).replace(str(tmp), str(profile))}")
if kind == "v1":
    os.replace(write(keys_path, format_keys(keys), 0o600), keys_path)
os.replace(tmp, profile)
print(f"url={url}")
print("client=" + (enrolled[1] if enrolled else ""))
print("instance=" + (enrolled[2] if enrolled else ""))
print("kid=" + (enrolled[3] if enrolled else ""))
'

# argv: profile-path; prints the path of its v2 key (as webknock keygen picks it) and the
# client name webknock keygen suggests to the admin (the host name's first label)
PY_CLIENT_KEYPATH='
import sys
from pathlib import Path
from webknock.client.keygen import client_name, key_path
print(key_path(Path(sys.argv[1])))
print(client_name())
'

# argv: a public key line wk2:...; prints its key id (hex), as client add puts it in profiles
PY_KID='
import sys
from webknock.protocol import v2
print(v2.key_id(v2.parse_public_key(sys.argv[1])[0]).hex())
'

# -- server --------------------------------------------------------------------------------

server_defaults() {
    INSTANCE_OPT=webknock
    TCP_PORTS="" TCP_SET=0 UDP_PORTS="" UDP_SET=0 MAX_TIME="" BACKEND="" PROTECT="" WEB_USER=""
    WEB_SERVER="" CGI_DIR="" URL="" URL_SET=0 NO_APT=0 NO_START=0 YES=0 V1=0
}

parse_server_args() {
    while [ $# -gt 0 ]; do
        case $1 in
            --instance) INSTANCE_OPT=${2?--instance needs a value}; shift ;;
            --tcp-ports) TCP_PORTS=${2?--tcp-ports needs a value}; TCP_SET=1; shift ;;
            --udp-ports) UDP_PORTS=${2?--udp-ports needs a value}; UDP_SET=1; shift ;;
            --max-time) MAX_TIME=${2?--max-time needs a value}; shift ;;
            --backend) BACKEND=${2?--backend needs a value}; shift ;;
            --protect) PROTECT=${2?--protect needs a value}; shift ;;
            --web-user) WEB_USER=${2?--web-user needs a value}; shift ;;
            --web-server) WEB_SERVER=${2?--web-server needs a value}; shift ;;
            --cgi-dir) CGI_DIR=${2?--cgi-dir needs a value}; shift ;;
            --url) URL=${2?--url needs a value}; URL_SET=1; shift ;;
            --v1) V1=1 ;;
            --root) ROOT=${2?--root needs a value}; shift ;;
            --no-apt) NO_APT=1 ;;
            --no-start) NO_START=1 ;;
            -y | --yes) YES=1 ;;
            -h | --help) help_server; exit 0 ;;
            *) usage_error "server: unknown option $1" ;;
        esac
        shift
    done
}

validate_server_args() {
    [[ $INSTANCE_OPT =~ $NAME_RE ]] \
        || usage_error "--instance: $INSTANCE_OPT: use letters, digits, _ or - (at most 16)"
    [ -z "$TCP_PORTS" ] || TCP_PORTS=$(norm_ports --tcp-ports "$TCP_PORTS")
    [ -z "$UDP_PORTS" ] || UDP_PORTS=$(norm_ports --udp-ports "$UDP_PORTS")
    if [ -n "$MAX_TIME" ]; then
        if ! [[ $MAX_TIME =~ ^[0-9]{1,6}$ ]] || [ "$MAX_TIME" -lt 1 ] || [ "$MAX_TIME" -gt 604800 ]; then
            usage_error "--max-time: $MAX_TIME is not a number of seconds from 1 to 604800"
        fi
    fi
    case ${BACKEND:-auto} in auto | iptables | nftables) ;; *) usage_error "--backend: auto, iptables or nftables" ;; esac
    case ${PROTECT:-no} in yes | no) ;; *) usage_error "--protect: yes or no" ;; esac
    case ${WEB_SERVER:-none} in nginx | apache | none) ;; *) usage_error "--web-server: nginx, apache or none" ;; esac
    if [ -n "$CGI_DIR" ]; then
        [[ $CGI_DIR =~ $PATH_RE ]] || usage_error "--cgi-dir: $CGI_DIR must be an absolute path of letters, digits and ._/+-"
    fi
    if [ -n "$URL" ]; then
        [[ $URL =~ $URL_RE ]] || usage_error "--url: $URL must look like https://HOST/PATH"
    fi
    if [ -n "$WEB_USER" ]; then
        id -u -- "$WEB_USER" >/dev/null 2>&1 || usage_error "--web-user: no such user $WEB_USER"
    fi
}

default_web_server() {
    if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
        echo nginx
    elif command -v apache2 >/dev/null || [ -x /usr/sbin/apache2 ]; then
        echo apache
    else
        echo nginx
    fi
}

default_url_path() {
    if [ -n "$CGI_DIR" ]; then
        printf '/cgi-bin/%s' "$(basename -- "$CGI_COPY")"
    elif [ "$INSTANCE" = webknock ]; then
        printf '/webknock'
    else
        printf '/webknock-%s' "$INSTANCE"
    fi
}

ask_server_settings() {
    local config_exists=$1
    if on_terminal; then
        say "webknock server setup (instance $INSTANCE); Enter keeps the [default]."
        if [ "$config_exists" = 0 ]; then
            if [ "$TCP_SET" = 0 ]; then
                ask TCP_PORTS "TCP ports clients may open (none: -)" 22
                [ "$TCP_PORTS" != - ] || TCP_PORTS=""
                TCP_SET=1
            fi
            if [ "$UDP_SET" = 0 ]; then
                ask UDP_PORTS "UDP ports clients may open (none: -)" -
                [ "$UDP_PORTS" != - ] || UDP_PORTS=""
                UDP_SET=1
            fi
            [ -n "$MAX_TIME" ] || ask MAX_TIME "Longest grant in seconds" 3600
            [ -n "$PROTECT" ] || ask PROTECT "Close the offered ports to everyone without a grant (yes/no)" no
        fi
        [ -n "$WEB_SERVER" ] || ask WEB_SERVER "Web server (nginx/apache/none)" "$(default_web_server)"
        [ -n "$URL" ] || ask URL "Knock URL clients use" "https://$(hostname -f 2>/dev/null || hostname)$(default_url_path)"
        validate_server_args
    fi
}

server_packages() {
    local backend=$1 pkgs=(python3-venv)
    case $backend in
        iptables) pkgs+=(iptables ipset) ;;
        nftables) pkgs+=(nftables python3-nftables) ;;
        *) pkgs+=(nftables python3-nftables iptables ipset) ;;
    esac
    case $WEB_SERVER in
        nginx) # Without systemd as PID 1, Debian's fcgiwrap init script needs spawn-fcgi
            # (without it, service fcgiwrap start silently does nothing).
            pkgs+=(nginx fcgiwrap)
            [ -d /run/systemd/system ] || pkgs+=(spawn-fcgi) ;;
        apache) pkgs+=(apache2) ;;
    esac
    if ! command -v cron >/dev/null && [ ! -x /usr/sbin/cron ]; then
        pkgs+=(cron)
    fi
    apt_install "${pkgs[@]}"
}

# build_venv DIR EXTRA: a venv from Debian's python with webknock (+EXTRA) and pinned deps.
build_venv() {
    local dir=$1 extra=$2 src python=$1/bin/python3
    [ -x "$SYSTEM_PYTHON" ] || die "$SYSTEM_PYTHON not found (apt-get install python3)"
    "$SYSTEM_PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
        || die "$SYSTEM_PYTHON cannot make venvs (apt-get install python3-venv)"
    if [ -x "$python" ] && grep -qx 'include-system-site-packages = true' "$dir/pyvenv.cfg" 2>/dev/null \
        && "$python" -I -c '' 2>/dev/null; then
        step "updating the venv $dir"
    else
        step "creating the venv $dir (from $SYSTEM_PYTHON, with system site-packages)"
        rm -rf -- "$dir"
        mkdir -p -- "$(dirname -- "$dir")"
        "$SYSTEM_PYTHON" -m venv --system-site-packages "$dir"
    fi
    chmod 0755 "$dir"
    # Build from a clean copy: the source tree gets no build/ or egg-info, and a re-run
    # always installs the code of this tree (same version number or not).
    src=$WORK/build/webknock
    rm -rf -- "$WORK/build"
    mkdir -p -- "$src"
    cp -r -- "$SRC/pyproject.toml" "$SRC/webknock" "$src/"
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    (
        cd "$src/.." || exit 1
        "$python" -I -m pip uninstall -q -y webknock >/dev/null 2>&1 || true
        # --ignore-installed: every pinned dependency goes into the venv itself, even where a
        # Debian package of the same version would satisfy pip; the CGI (-IS) sees only the
        # venv's site-packages.
        "$python" -I -m pip install -q --disable-pip-version-check --no-warn-script-location \
            --ignore-installed -c "$SRC/requirements.txt" "./webknock$extra"
    ) || die "pip could not install webknock into $dir (see above; PyPI must be reachable)"
    # Byte-compile everything now: the web user can never write __pycache__ here.
    "$python" -I -m compileall -q -j 0 "$dir/lib" >/dev/null \
        || die "byte-compiling $dir failed"
}

write_keys() {
    if [ -e "$KEYS" ]; then
        pyrun "$PY" "$PY_CHECKKEYS" "$KEYS" \
            || die "$KEYS exists but is not a usable keys file; fix or move it away, then re-run"
        local was
        was=$(stat -c '%a %U:%G' -- "$KEYS")
        # Only webknockd (root) reads the keys: take away the web group and any bit beyond
        # 0600, never add one (an admin's 0400 stays 0400).
        chown root:root -- "$KEYS"
        chmod u-x,go-rwx -- "$KEYS"
        if [ "$was" != "$(stat -c '%a %U:%G' -- "$KEYS")" ]; then
            KEYS_STATUS="kept, tightened from $was to $(stat -c '%a %U:%G' -- "$KEYS"): only webknockd reads them now"
        else
            KEYS_STATUS="kept (owner root:root, mode $(stat -c '%a' -- "$KEYS"))"
        fi
        return
    fi
    local tmp
    tmp=$(mktemp "$ETC/.keys.XXXXXX")
    chmod 0600 "$tmp"
    pyrun "$PY" "$PY_GENKEYS" >"$tmp"
    chown root:root -- "$tmp"
    mv -n -- "$tmp" "$KEYS"
    [ ! -e "$tmp" ] || { rm -f -- "$tmp"; die "$KEYS appeared while writing it; re-run"; }
    KEYS_STATUS="new, from the OS random generator (owner root:root, mode 0600)"
}

write_config() {
    local tmp want
    if [ -e "$CONFIG" ]; then
        CONFIG_STATUS="kept (edit it to change settings; $SHARE/webknock.ini.example lists them all)"
        return
    fi
    tmp=$(mktemp "$ETC/.config.XXXXXX")
    {
        printf '# webknock instance %s, written by install.sh on %s.\n' "$INSTANCE" "$(date -u +%Y-%m-%d)"
        printf '# Every setting with its default: %s/webknock.ini.example\n' "$SHARE"
        printf '# install.sh keeps this file when re-run. After a change: systemctl restart %s\n' "$UNIT_NAME"
        printf '[server]\n'
        printf 'instance = %s\n' "$INSTANCE"
        [ -z "$TCP_PORTS" ] || printf 'tcp_ports = %s\n' "$TCP_PORTS"
        [ -z "$UDP_PORTS" ] || printf 'udp_ports = %s\n' "$UDP_PORTS"
        printf 'max_time = %s\n' "$MAX_TIME"
        printf '# the knock URL, printed in the profiles of webknockctl client add\n'
        printf 'url = %s\n' "$URL"
        if [ "$V1_ON" = 1 ]; then
            printf '# protocol v1 (shared keys; install.sh server --v1): the original PHP clients\n'
            printf 'keys_file = %s\n' "$KEYS"
        fi
        printf 'spool_dir = %s\n' "$SPOOL_BASE/$INSTANCE"
        printf 'state_file = %s\n' "$STATE_DIR/$INSTANCE.db"
        printf '# every grant, renewal, expiry and revoke (webknockctl log reads it)\n'
        printf 'audit_log = %s\n' "$LOG_DIR/$INSTANCE.jsonl"
        printf 'backend = %s\n' "$BACKEND"
        printf 'web_user = %s\n' "$WEB_USER"
        printf 'protect = %s\n' "$PROTECT"
    } >"$tmp"
    chmod 0644 "$tmp"
    if ! want=$(pyrun "$PY" "$PY_CONFIG" "$tmp" 2>&1); then
        rm -f -- "$tmp"
        die "the config install.sh wrote does not validate: $want"
    fi
    mv -n -- "$tmp" "$CONFIG"
    [ ! -e "$tmp" ] || { rm -f -- "$tmp"; die "$CONFIG appeared while writing it; re-run"; }
    CONFIG_STATUS="new"
}

# --v1 on an installed instance without v1: add keys_file to its [server] section (the
# only change install.sh ever makes to an existing config), validated before it replaces it.
enable_v1_in_config() {
    local tmp out
    tmp=$(mktemp "$ETC/.config.XXXXXX")
    awk -v line="keys_file = $KEYS" -v date="$(date -u +%Y-%m-%d)" '
        { print }
        !done && /^[[:space:]]*\[server\][[:space:]]*$/ {
            print "# protocol v1 (shared keys), added by install.sh server --v1 on " date
            print line
            done = 1
        }
        END { if (!done) exit 1 }' "$CONFIG" >"$tmp" \
        || { rm -f -- "$tmp"; die "$CONFIG: no [server] line found; add keys_file = $KEYS to it yourself"; }
    chown --reference="$CONFIG" -- "$tmp"
    chmod --reference="$CONFIG" -- "$tmp"
    if ! out=$(pyrun "$PY" "$PY_CONFIG" "$tmp" 2>&1) || ! grep -qxF "keys_file=$KEYS" <<<"$out"; then
        rm -f -- "$tmp"
        die "could not add keys_file to $CONFIG ($out); add keys_file = $KEYS under [server] yourself and re-run"
    fi
    mv -f -- "$tmp" "$CONFIG"
}

declare -A CFG=()
load_config() { # load_config FILE: validate it and fill CFG[...]
    local out line
    out=$(pyrun "$PY" "$PY_CONFIG" "$1" 2>&1) || die "$out"
    CFG=()
    while IFS= read -r line; do
        CFG[${line%%=*}]=${line#*=}
    done <<<"$out"
}

report_config_differences() {
    local key flag value given
    for key in tcp_ports udp_ports max_time backend protect web_user; do
        case $key in
            tcp_ports) flag=--tcp-ports value=$TCP_PORTS given=$TCP_SET ;;
            udp_ports) flag=--udp-ports value=$UDP_PORTS given=$UDP_SET ;;
            max_time) flag=--max-time value=$MAX_TIME given=${MAX_TIME:+1} ;;
            backend) flag=--backend value=$BACKEND given=${BACKEND:+1} ;;
            protect) flag=--protect value=$PROTECT given=${PROTECT:+1} ;;
            web_user) flag=--web-user value=$WEB_USER given=${WEB_USER:+1} ;;
        esac
        if [ "$given" = 1 ] && [ "$value" != "${CFG[$key]}" ]; then
            warn "kept $CONFIG: its $key is '${CFG[$key]}', not '$value' from $flag; edit the file to change it"
        fi
    done
    if [ "$URL_SET" = 1 ] && [ -n "${CFG[url]}" ] && [ "$URL" != "${CFG[url]}" ]; then
        warn "kept $CONFIG: its url is '${CFG[url]}', not '$URL' from --url; edit the file to change it"
    fi
}

manifest_get() { # manifest_get FILE KEY: every value of KEY
    [ -f "$1" ] || return 0
    sed -n "s/^$2=//p" "$1"
}

# manifest_union KEY NEW: the recorded values of KEY plus NEW, one per line, as KEY=VALUE
manifest_union() {
    { manifest_get "$MANIFEST" "$1"; [ -z "$2" ] || printf '%s\n' "$2"; } \
        | awk -v key="$1" 'NF && !seen[$0]++ { print key "=" $0 }'
}

write_manifest() {
    mkdir -p -- "$MANIFESTS"
    {
        printf '# what install.sh installed for instance %s (read by install.sh uninstall)\n' "$INSTANCE"
        printf 'config=%s\n' "$CONFIG"
        printf 'url=%s\n' "$URL"
        printf 'web_server=%s\n' "$WEB_SERVER"
        manifest_union snippet "$SNIPPET"
        manifest_union cgi_copy "$CGI_COPY"
    } >"$MANIFEST.new"
    chmod 0644 "$MANIFEST.new"
    mv -f -- "$MANIFEST.new" "$MANIFEST"
}

cron_line() {
    printf '* * * * * root test -x %s/webknockctl && %s/webknockctl --config %s reap -q\n' \
        "$SBIN" "$SBIN" "$1"
}

cron_update() { # cron_update add|remove CONFIG
    local action=$1 config=$2 tmp
    tmp=$WORK/cron
    if [ -f "$CRON_FILE" ]; then
        grep -vF -- " --config $config reap" "$CRON_FILE" >"$tmp" || true
    else
        grep -v '^\*' "$SRC/etc/cron.d/webknock" >"$tmp"
    fi
    if [ "$action" = add ]; then
        cron_line "$config" >>"$tmp"
    fi
    if grep -q '^[^#[:space:]].* reap' "$tmp"; then
        mkdir -p -- "$(dirname -- "$CRON_FILE")"
        install_file 0644 "$tmp" "$CRON_FILE"
    else
        rm -f -- "$CRON_FILE"
    fi
}

prefixed() { # prefixed TEXT: the paths of the shipped unit below $ROOT
    local text=$1 p
    if [ -n "$ROOT" ]; then
        for p in /usr/local/sbin/ /etc/webknock/ /var/spool/webknock /run/webknock /var/lib/webknock /var/log/webknock; do
            text=${text//"$p"/"$ROOT$p"}
        done
    fi
    printf '%s\n' "$text"
}

install_unit() {
    mkdir -p -- "$(dirname -- "$UNIT")"
    prefixed "$(cat -- "$SRC/etc/systemd/webknockd@.service")" | write_file 0644 "$UNIT"
}

# The capability bounding set of the unit, for setpriv (the same sandbox without systemd).
unit_caps() {
    local caps out=-all c
    caps=$(sed -n 's/^CapabilityBoundingSet=//p' "$SRC/etc/systemd/webknockd@.service")
    for c in $caps; do
        c=${c#CAP_}
        out+=",+${c,,}"
    done
    printf '%s' "$out"
}

# substitute TEXT OLD NEW [optional]: replace, dying when a required OLD is missing.
substitute() {
    local text=$1 old=$2 new=$3 optional=${4:-}
    if [[ $text != *"$old"* ]]; then
        [ -n "$optional" ] || die "shipped snippet no longer contains '$old'"
    fi
    printf '%s' "${text//"$old"/"$new"}"
}

write_snippet() {
    local text url_path=$1 cgi=$2
    case $WEB_SERVER in
        nginx)
            SNIPPET=$ETC/nginx-$INSTANCE.conf
            text=$(cat -- "$SRC/etc/nginx/webknock.conf")
            text=$(substitute "$text" "location = /webknock {" "location = $url_path {")
            text=$(substitute "$text" "/etc/webknock/nginx-webknock.conf" "$SNIPPET" optional)
            ;;
        apache)
            SNIPPET=$ETC/apache-$INSTANCE.conf
            text=$(cat -- "$SRC/etc/apache2/webknock.conf")
            text=$(substitute "$text" "ScriptAlias /webknock " "ScriptAlias $url_path ")
            text=$(substitute "$text" "<Location /webknock>" "<Location $url_path>")
            text=$(substitute "$text" "/etc/webknock/apache-webknock.conf" "$SNIPPET" optional)
            ;;
        *)
            SNIPPET=""
            return 0
            ;;
    esac
    text=$(substitute "$text" "/usr/lib/cgi-bin/webknock.cgi" "$cgi")
    text=$(substitute "$text" "/etc/webknock/webknock.ini" "$CONFIG")
    text=$(substitute "$text" "https://HOST/webknock" "$URL" optional)
    printf '%s\n' "$text" | write_file 0644 "$SNIPPET"
}

daemon_pid() { # pid of the running webknockd of $CONFIG (its lock), or nothing
    [ -x "$PY" ] && [ -f "$CONFIG" ] || return 0
    pyrun "$PY" "$PY_DAEMON_PID" "$CONFIG" 2>/dev/null || true
}

stop_direct_daemon() {
    local pid i
    pid=$(daemon_pid)
    [ -n "$pid" ] && [ "$pid" -gt 0 ] || return 0
    step "stopping webknockd (instance $INSTANCE, pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        [ -n "$(daemon_pid)" ] || break
        sleep 0.1
    done
    if [ -n "$(daemon_pid)" ]; then
        warn "webknockd pid $pid did not stop within 15 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f -- "$PIDFILE"
}

start_direct_daemon() {
    local pid i offset
    stop_direct_daemon
    mkdir -p -- "$RUN_DIR" "$LOG_DIR"
    chmod 0750 -- "$LOG_DIR"
    touch -- "$DAEMON_LOG"
    chmod 0640 -- "$DAEMON_LOG"
    offset=$(stat -c %s -- "$DAEMON_LOG")
    step "systemd is not running: starting webknockd directly (log $DAEMON_LOG)"
    # setsid: own session, no terminal; setpriv: the unit's capability bounding set.
    setsid setpriv --no-new-privs --bounding-set "$(unit_caps)" \
        "$SBIN/webknockd" --config "$CONFIG" </dev/null >>"$DAEMON_LOG" 2>&1 &
    for ((i = 0; i < 150; i++)); do
        pid=$(daemon_pid)
        if [ -n "$pid" ] && tail -c +"$((offset + 1))" -- "$DAEMON_LOG" | grep -q 'restored'; then
            printf '%s\n' "$pid" >"$PIDFILE"
            say "    webknockd running, pid $pid"
            return 0
        fi
        if ! kill -0 $! 2>/dev/null && [ -z "$pid" ]; then
            break
        fi
        sleep 0.1
    done
    tail -n 20 -- "$DAEMON_LOG" | indent >&2
    die "webknockd did not start (log above, $DAEMON_LOG)"
}

start_daemon() {
    if systemd_running; then
        step "enabling and (re)starting $UNIT_NAME"
        systemctl daemon-reload
        if ! systemctl -q is-active "$UNIT_NAME" && [ -n "$(daemon_pid)" ]; then
            stop_direct_daemon # started directly before; systemd takes over
        fi
        systemctl enable -q "$UNIT_NAME"
        systemctl restart "$UNIT_NAME"
        local i
        for ((i = 0; i < 100; i++)); do
            [ -z "$(daemon_pid)" ] || return 0
            systemctl -q is-failed "$UNIT_NAME" && break
            sleep 0.1
        done
        journalctl -u "$UNIT_NAME" -n 20 --no-pager >&2 || true
        die "$UNIT_NAME did not start (journalctl -u $UNIT_NAME)"
    else
        start_direct_daemon
        say "    note: nothing starts it at boot without systemd; run this installer again or"
        say "    start $SBIN/webknockd --config $CONFIG from your init system"
    fi
}

ssh_session() { # prints "IP PORT" of the SSH session running this installer, if any
    if [ -n "${SSH_CLIENT:-}" ]; then
        # shellcheck disable=SC2086 # split on spaces
        set -- $SSH_CLIENT #: client-ip client-port server-port
        [ $# -ge 3 ] && printf '%s %s' "$1" "$3"
    elif [ -n "${SSH_CONNECTION:-}" ]; then
        # shellcheck disable=SC2086 # split on spaces
        set -- $SSH_CONNECTION # client-port server-ip server-port
        [ $# -ge 4 ] && printf '%s %s' "$1" "$4"
    fi
    return 0
}

protect_admin_session() {
    local session ip port
    session=$(ssh_session)
    if [ -z "$session" ]; then
        say "protect = yes: no SSH session found (\$SSH_CLIENT is unset; sudo drops it unless"
        say "    run as sudo --preserve-env=SSH_CLIENT). Knock before opening new connections to"
        say "    ${CFG[tcp_ports]}; established connections never drop."
        return 0
    fi
    read -r ip port <<<"$session"
    if ! [[ ", ${CFG[tcp_ports]}, " == *", $port, "* ]]; then
        say "protect = yes: your SSH port $port is not offered, so protect does not close it."
        return 0
    fi
    step "protect = yes: granting your SSH session's address first"
    "$SBIN/webknockctl" --config "$CONFIG" grant "$ip" --port "$port" | indent \
        || die "could not grant $ip tcp/$port; not starting webknockd (fix and re-run)"
    say "    $ip may open new connections to tcp/$port for ${CFG[max_time]} s (from \$SSH_CLIENT);"
    say "    established connections never drop. Knock with a client before it runs out."
}

check_installation() {
    local out rc=0 err
    err=$WORK/check-config.err
    # stdout: the findings; stderr: log lines (and the reason of exit 2)
    out=$("$SBIN/webknockctl" --config "$CONFIG" check-config 2>"$err") || rc=$?
    [ "$rc" -le 1 ] || [ "$rc" = 3 ] || out=$(cat -- "$err")
    case $rc in
        0) say "    $out" ;;
        3)
            # Before webknockd's first start its state file does not exist: expected.
            out=$(grep -v "state file .* does not exist yet" <<<"$out" || true)
            if [ -z "$out" ]; then
                say "    OK (the state file appears when webknockd first runs)"
            else
                printf '%s\n' "$out" | indent
            fi
            ;;
        *)
            printf '%s\n' "$out" | indent >&2
            [ -n "$ROOT" ] || die "webknockctl check-config found errors (above)"
            warn "check-config found errors (above); continuing (--root)"
            ;;
    esac
}

print_web_instructions() {
    local host
    host=$(sed -E 's#^https?://([^/]+)/.*#\1#' <<<"$URL")
    if [ -n "$CGI_COPY" ]; then
        say "CGI: $CGI_COPY (this instance's config built in). With Debian's Apache:"
        say "    a2enmod cgid && a2enconf serve-cgi-bin && systemctl reload apache2"
        say "  clients use the URL under which your web server runs it: $URL"
    fi
    case $WEB_SERVER in
        nginx)
            say "nginx + fcgiwrap: add this line inside the server { } block that serves $host"
            say "(HTTPS), e.g. in /etc/nginx/sites-available/default:"
            say "    include $SNIPPET;"
            say "then: nginx -t && systemctl reload nginx && systemctl enable --now fcgiwrap.socket"
            say "(without systemd: apt-get install spawn-fcgi; service fcgiwrap start;"
            say " service nginx reload: fcgiwrap's init script needs spawn-fcgi). $SNIPPET:"
            indent <"$SNIPPET"
            ;;
        apache)
            say "Apache: add this line inside the <VirtualHost> that serves $host (HTTPS):"
            say "    Include $SNIPPET"
            say "then: a2enmod cgid && apachectl configtest && systemctl reload apache2. $SNIPPET:"
            indent <"$SNIPPET"
            ;;
        none)
            [ -n "$CGI_COPY" ] || {
                say "Web server: none chosen. Serve $CGI as a CGI at $URL with"
                say "WEBKNOCK_CONFIG=$CONFIG in its environment (snippets: $SHARE/)."
            }
            ;;
    esac
}

print_enrol_instructions() {
    local ctl=webknockctl
    [ -z "$ROOT" ] || ctl=$SBIN/webknockctl
    if [ -n "$ROOT" ] || [ "$INSTANCE" != webknock ]; then
        ctl="$ctl --config $CONFIG"
    fi
    say "Enrol clients (protocol v2: one key per client; no secret leaves either side):"
    say "  1. on the client: install.sh client --profile NAME --keygen-only"
    say "     (or, with the client installed: webknock --profile NAME keygen)"
    say "     prints its public key line wk2:... and the command to send you"
    say "  2. here: $ctl client add NAME --key 'wk2:...' [--ports tcp/22]"
    say "     [--max-time S] [--from NETWORKS] [--expires YYYY-MM-DD] prints the client's"
    say "     profile (url, server_key, ports): send it back to the client"
    say "  3. on the client: install.sh client --profile NAME, and paste it (or --from"
    say "     FILE); then: webknock --profile NAME knock"
    say "  Later: $ctl client list | disable NAME | remove NAME --revoke"
}

cmd_server() {
    server_defaults
    ROOT=""
    parse_server_args "$@"
    need_root server
    check_root_dir
    [ -z "$ROOT" ] || { NO_APT=1; NO_START=1; }
    validate_server_args
    set_paths
    instance_paths "$INSTANCE_OPT"
    if [ ! -f "$SRC/pyproject.toml" ] || [ ! -d "$SRC/webknock" ]; then
        die "$SRC is not a webknock source tree"
    fi

    local config_exists=0 backend_guess url_path
    [ -e "$CONFIG" ] && config_exists=1
    CGI_COPY="" SNIPPET=""
    if [ -n "$CGI_DIR" ]; then
        CGI_COPY=$ROOT$CGI_DIR/webknock.cgi
        [ "$INSTANCE" = webknock ] || CGI_COPY=$ROOT$CGI_DIR/webknock-$INSTANCE.cgi
    fi
    # A re-run remembers the URL and web server of the first run.
    [ -n "$URL" ] || URL=$(manifest_get "$MANIFEST" url | head -n1)
    [ -n "$WEB_SERVER" ] || WEB_SERVER=$(manifest_get "$MANIFEST" web_server | head -n1)
    ask_server_settings "$config_exists"
    : "${WEB_SERVER:=$(default_web_server)}"
    : "${URL:=https://$(hostname -f 2>/dev/null || hostname)$(default_url_path)}"
    backend_guess=${BACKEND:-auto}
    [ "$config_exists" = 0 ] || backend_guess=$(ini_value "$CONFIG" backend)

    [ -n "$ROOT" ] || server_packages "${backend_guess:-auto}"
    build_venv "$VENV" "[server]"

    step "installing entry points"
    mkdir -p -- "$(dirname -- "$CGI")" "$SBIN" "$SHARE"
    install_shim "$SRC/cgi-bin/webknock.cgi" "$CGI" "$PY"
    install_shim "$SRC/sbin/webknockd" "$SBIN/webknockd" "$PY"
    install_shim "$SRC/sbin/webknockctl" "$SBIN/webknockctl" "$PY"
    install_file 0644 "$SRC/etc/webknock/webknock.ini.example" "$SHARE/webknock.ini.example"
    install_file 0644 "$SRC/etc/nginx/webknock.conf" "$SHARE/nginx-webknock.conf"
    install_file 0644 "$SRC/etc/apache2/webknock.conf" "$SHARE/apache-webknock.conf"

    mkdir -p -- "$ETC" "$STATE_DIR"
    chmod 0755 -- "$ETC"
    chmod 0700 -- "$STATE_DIR"
    # Record the instance before creating its files, so an interrupted run can be uninstalled.
    write_manifest

    # Protocol v1 (the shared keys): on for a new instance only with --v1; an instance that
    # has it keeps it (never turned off here); --v1 adds it to one that has not.
    V1_ON=$V1 V1_ADDED=0
    if [ "$config_exists" = 1 ]; then
        load_config "$CONFIG"
        report_config_differences
        WEB_USER=${CFG[web_user]}
        if [ -n "${CFG[keys_file]}" ]; then
            KEYS=${CFG[keys_file]} V1_ON=1
        elif [ "$V1" = 1 ]; then
            V1_ADDED=1
        fi
    else
        [ "$TCP_SET" = 1 ] || TCP_PORTS=22
        [ -n "$TCP_PORTS$UDP_PORTS" ] || usage_error "no ports: give --tcp-ports and/or --udp-ports"
        : "${MAX_TIME:=3600}" "${BACKEND:=auto}" "${PROTECT:=no}" "${WEB_USER:=www-data}"
    fi
    WEB_GROUP=$(id -gn -- "$WEB_USER") || die "web user $WEB_USER does not exist"

    step "keys and config in $ETC"
    if [ "$V1_ON" = 1 ]; then
        [ -d "$(dirname -- "$KEYS")" ] || die "the directory of keys_file $KEYS does not exist"
        write_keys
    fi
    write_config
    if [ "$V1_ADDED" = 1 ]; then
        enable_v1_in_config
        CONFIG_STATUS="kept, keys_file added (--v1)"
    fi
    load_config "$CONFIG"
    [ "$V1_ON" = 0 ] || say "    $KEYS: $KEYS_STATUS"
    # Protocol v2: the server's own signing key (0600 root), made once, kept after.
    SERVER_KEY=$(pyrun "$PY" "$PY_SERVERKEY" "$CONFIG") \
        || die "the v2 server key of $CONFIG is not usable (see above)"
    say "    v2 server key: ${SERVER_KEY%% *} (public ${SERVER_KEY#* })"
    say "    $CONFIG: $CONFIG_STATUS"
    if [ "$V1_ON" = 0 ]; then
        say "    protocol v1: off (no keys file; --v1 turns it on, for the original PHP clients)"
    elif [ "$V1_ADDED" = 1 ] || [ "$config_exists" = 0 ]; then
        say "    protocol v1: on (keys_file ${CFG[keys_file]}; for the original PHP clients and v1 profiles)"
    else
        say "    protocol v1: on (kept: $CONFIG has keys_file ${CFG[keys_file]}; remove that line to turn it off)"
    fi
    if [ -z "${CFG[url]}" ]; then
        say "    (no url in $CONFIG: add url = $URL under [server] to have webknockctl client add print it)"
    fi

    step "spool ${CFG[spool_dir]} (group $WEB_GROUP), state ${CFG[state_file]}"
    # Its own bounded tmpfs only on this host's real /run, not under --root.
    pyrun "$PY" "$PY_SPOOL" "${CFG[spool_dir]}" "$(id -g -- "$WEB_USER")" \
        "$([ -z "$ROOT" ] && echo mount || echo nomount)"

    if [ -n "$CGI_COPY" ]; then
        step "CGI copy $CGI_COPY"
        mkdir -p -- "$(dirname -- "$CGI_COPY")"
        install_shim "$SRC/cgi-bin/webknock.cgi" "$CGI_COPY" "$PY" "$CONFIG"
    fi
    url_path=/${URL#*://*/}
    write_snippet "${url_path%%[?#]*}" "$CGI"
    write_manifest

    step "cron fallback $CRON_FILE, systemd unit $UNIT, log rotation $LOGROTATE"
    cron_update add "$CONFIG"
    install_unit
    # The audit trails (audit_log = /var/log/webknock/*.jsonl): readable by group adm.
    mkdir -p -- "$LOG_DIR" "$(dirname -- "$LOGROTATE")"
    chown root:adm -- "$LOG_DIR" 2>/dev/null || chown root:root -- "$LOG_DIR"
    chmod 0750 -- "$LOG_DIR"
    install_file 0644 "$SRC/etc/logrotate.d/webknock" "$LOGROTATE"

    step "checking the installation (webknockctl check-config)"
    check_installation

    if [ -n "$ROOT" ]; then
        say "==> --root: nothing started, firewall untouched"
    elif [ "$NO_START" = 1 ]; then
        say "==> --no-start: webknockd not started (systemctl enable --now $UNIT_NAME)"
    else
        [ "${CFG[protect]}" != yes ] || protect_admin_session
        start_daemon
    fi

    say ""
    print_web_instructions
    say ""
    print_enrol_instructions
    if [ "$V1_ON" = 1 ]; then
        say ""
        say "Protocol v1 is on (shared keys, for the original PHP clients and v1 profiles)."
        say "v1 client profile - on each v1 client run \`install.sh client --profile NAME\` and"
        say "paste this (or save it to a file for --from FILE). It holds the secret keys:"
        pyrun "$PY" "$PY_PROFILE" "$CONFIG" "$URL"
    fi
    say ""
    say "Done: instance $INSTANCE. Status: webknockctl --config $CONFIG status"
}

# -- profile -------------------------------------------------------------------------------

cmd_profile() {
    local inst=webknock url=""
    ROOT="" YES=1
    while [ $# -gt 0 ]; do
        case $1 in
            --instance) inst=${2?--instance needs a value}; shift ;;
            --url) url=${2?--url needs a value}; shift ;;
            --root) ROOT=${2?--root needs a value}; shift ;;
            -h | --help) help_profile; exit 0 ;;
            *) usage_error "profile: unknown option $1" ;;
        esac
        shift
    done
    need_root profile
    check_root_dir
    [[ $inst =~ $NAME_RE ]] || usage_error "--instance: $inst is not an instance name"
    set_paths
    instance_paths "$inst"
    if [ ! -x "$PY" ] || [ ! -f "$CONFIG" ]; then
        die "instance $inst is not installed (no $CONFIG)"
    fi
    [ -n "$url" ] || url=$(manifest_get "$MANIFEST" url | head -n1)
    pyrun "$PY" "$PY_PROFILE" "$CONFIG" "$url" || exit 1
}

# -- client --------------------------------------------------------------------------------

BLOB_HELP="pass the profile \`webknockctl client add\` printed (v2) or the blob \`install.sh server --v1\` printed (v1) with --from FILE, on stdin with --from - (e.g. --from - < FILE), or paste it on a terminal"

refuse_profile() { # refuse_profile MESSAGE: a wrong or missing profile (exit 2), and how to pass one
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    printf '%s: %s\n' "$PROG" "$BLOB_HELP" >&2
    exit 2
}

# paste_profile: copy a profile pasted on the terminal to stdout. Reading stops by itself after
# the profile's last line - the END line of a v1 blob, or once [client] has its ports and its
# server_key (v2) or the last v1 key - taking whatever else the same paste held; Ctrl-D ends
# it at any time.
paste_profile() {
    local line t begin=0 client=0 ports=0 keyed=0 complete=0
    while IFS= read -r line; do
        printf '%s\n' "$line"
        t=${line//[[:space:]]/}
        case $t in
            -----BEGINWEBKNOCKCLIENTPROFILE-----) begin=1 ;;
            -----ENDWEBKNOCKCLIENTPROFILE-----) complete=1 ;;
            '[client]') client=1 ;;
            ports=* | ports:*) ports=1 ;;
            server_key=* | server_key:* | sign=* | sign:*) keyed=1 ;;
        esac
        if [ "$begin" = 0 ] && [ "$client$ports$keyed" = 111 ]; then
            complete=1
        fi
        if [ "$complete" = 1 ]; then
            while IFS= read -r -t 0.5 line; do # the rest of the same paste, if any
                printf '%s\n' "$line"
            done
            return 0
        fi
    done
    [ -z "$line" ] || printf '%s\n' "$line" # a last line ended by Ctrl-D instead of Enter
}

read_profile() { # read_profile FROM DEST: the profile text from FILE, stdin or the terminal
    local from=$1 dest=$2
    if [ -n "$from" ] && [ "$from" != - ]; then
        [ -r "$from" ] && [ ! -d "$from" ] || refuse_profile "--from $from: no such readable file"
        cat -- "$from" >"$dest" || die "cannot read $from"
    elif [ -z "$from" ] && [ -t 0 ]; then
        say "Paste the client profile: the one \`webknockctl client add\` printed on the server"
        say "([client] ... ports = ...), or the v1 blob of \`install.sh server --v1\` (BEGIN to END)."
        say "Reading stops by itself after its last line (press Enter if the cursor stays on"
        say "that line; Ctrl-D also ends the input):"
        paste_profile >"$dest"
        say "(profile read)"
    elif [ "$from" = - ] || [ -f /dev/stdin ]; then
        cat >"$dest"
    elif [ -p /dev/stdin ] || [ -S /dev/stdin ]; then
        say "(reading the profile from stdin, to its end)" >&2
        cat >"$dest"
    else
        refuse_profile "no profile given: stdin is no terminal to paste it into, and no --from"
    fi
    grep -q '[^[:space:]]' "$dest" || refuse_profile "no profile given: the input was empty"
}

# profile_kind FILE: v1 or v2; a profile with both v1 keys and a server_key, or with neither,
# or a v2 one without url (and no --url), is refused (exit 2)
profile_kind() {
    local file=$1 url=$2 text v1=0 v2=0
    if grep -q -- '-----BEGIN WEBKNOCK CLIENT PROFILE-----' "$file" \
        && grep -q -- '-----END WEBKNOCK CLIENT PROFILE-----' "$file"; then
        text=$(sed -n '/-----BEGIN WEBKNOCK CLIENT PROFILE-----/,/-----END WEBKNOCK CLIENT PROFILE-----/p' "$file")
    else
        text=$(cat -- "$file")
    fi
    if grep -Eq '^[[:space:]]*\[v1\][[:space:]]*$|^[[:space:]]*keys_file[[:space:]]*[=:]' <<<"$text"; then
        v1=1
    fi
    if grep -Eq '^[[:space:]]*server_key[[:space:]]*[=:]' <<<"$text"; then
        v2=1
    fi
    case $v1$v2 in
        11) refuse_profile "the profile has both v1 keys ([v1] or keys_file) and a v2 server_key: a profile speaks v1 or v2, not both (send the one you mean)" ;;
        00) refuse_profile "no client profile in the input: neither the [v1] keys of a v1 blob nor the server_key = wk2:... line of a v2 profile" ;;
        10) echo v1 ;;
        01)
            if [ -z "$url" ] && ! grep -Eq '^[[:space:]]*url[[:space:]]*[=:][[:space:]]*[^[:space:]]' <<<"$text"; then
                printf '%s: error: %s\n' "$PROG" "the profile has no url (its server has no [server] url set): give the knock URL with --url https://HOST/PATH" >&2
                exit 2
            fi
            echo v2
            ;;
    esac
}

client_list_add() { # client_list_add KIND PATH: what install.sh client wrote, for uninstall --purge
    local list=$CONF_DIR/$CLIENT_LIST
    { grep -E '^(profile|key)=' "$list" 2>/dev/null || true; printf '%s=%s\n' "$1" "$2"; } \
        | sort -u | write_file 0644 "$list"
}

# client_key PROFILE: this client's v2 key for PROFILE, made by `webknock keygen` when there is
# none, else read by `webknock pubkey`; sets PUBKEY, KID, KEY_FILE, KEY_STATE and SUGGESTED.
client_key() {
    local ini=$1 out
    out=$(pyrun "$CPY" "$PY_CLIENT_KEYPATH" "$ini") || die "cannot tell where the key of $ini goes (see above)"
    KEY_FILE=$(sed -n 1p <<<"$out") SUGGESTED=$(sed -n 2p <<<"$out")
    if [ -e "$KEY_FILE" ] || [ -L "$KEY_FILE" ]; then
        out=$("${WEBKNOCK[@]}" --config "$ini" pubkey) \
            || die "cannot use this client's key $KEY_FILE (see above): fix its mode or move it away, then re-run"
        KEY_STATE="kept: it existed"
    else
        out=$("${WEBKNOCK[@]}" --config "$ini" keygen -q) || die "webknock keygen failed (see above)"
        KEY_STATE="new, made by webknock keygen"
        client_list_add key "$KEY_FILE"
    fi
    PUBKEY=$(sed -n 1p <<<"$out")
    KID=$(pyrun "$CPY" "$PY_KID" "$PUBKEY") || die "webknock printed no usable public key: $PUBKEY"
}

print_send() { # print_send NAME [remove]: the command the admin runs to enrol this client's key
    say "Send this to the server's admin, to run on the server:"
    if [ "${2:-}" = remove ]; then
        say "    webknockctl client remove $1 && webknockctl client add $1 --key '$PUBKEY'"
        say "(with the --ports, --max-time, --from and --expires $1 had; the public key holds no secret)"
    else
        say "    webknockctl client add $1 --key '$PUBKEY'"
        say "(the admin adds --ports, --max-time, --from, --expires as wanted and may choose another"
        say "name than $1; the public key holds no secret)"
    fi
}

cmd_client() {
    local profile=default from="" url="" no_venv=0 keygen_only=0 home bin blob mode kind ini out
    local shown client instance kid rc=0
    ROOT="" NO_APT=0 YES=0
    while [ $# -gt 0 ]; do
        case $1 in
            --profile) profile=${2?--profile needs a value}; shift ;;
            --from) from=${2?--from needs a value}; shift ;;
            --url) url=${2?--url needs a value}; shift ;;
            --keygen-only) keygen_only=1 ;;
            --root) ROOT=${2?--root needs a value}; shift ;;
            --no-apt) NO_APT=1 ;;
            --no-venv) no_venv=1 ;;
            -y | --yes) YES=1 ;;
            -h | --help) help_client; exit 0 ;;
            *) usage_error "client: unknown option $1" ;;
        esac
        shift
    done
    [[ $profile =~ $NAME_RE ]] || usage_error "--profile: $profile: use letters, digits, _ or - (at most 16)"
    if [ "$keygen_only" = 1 ] && [ -n "$from$url" ]; then
        usage_error "--keygen-only reads no profile: leave out --from and --url"
    fi
    check_root_dir
    [ -z "$ROOT" ] || NO_APT=1
    if [ "$(id -u)" = 0 ]; then
        home=$ROOT/opt/webknock-client bin=$ROOT/usr/local/bin CONF_DIR=$ROOT/etc/webknock/client.d mode=644
    else
        [ -z "$ROOT" ] || usage_error "--root needs root"
        home=$HOME/.local/share/webknock-client bin=$HOME/.local/bin CONF_DIR=$HOME/.config/webknock mode=600
        NO_APT=1
    fi
    ini=$CONF_DIR/$profile.ini

    # Read the profile first: a wrong paste should not cost a venv build.
    kind=keygen
    if [ "$keygen_only" = 0 ]; then
        blob=$WORK/blob
        read_profile "$from" "$blob"
        kind=$(profile_kind "$blob" "$url") || exit $?
    fi

    if [ "$no_venv" = 0 ]; then
        [ "$(id -u)" != 0 ] || apt_install python3-venv
        build_venv "$home/venv" "[client]"
        mkdir -p -- "$bin"
        install_shim "$SRC/client/webknock" "$bin/webknock" "$home/venv/bin/python3"
    fi
    CPY=$home/venv/bin/python3
    [ -x "$CPY" ] || die "the client is not installed ($home/venv); run without --no-venv"
    # The installed command; the venv's module where that is gone.
    if is_our_shim "$bin/webknock" "$CPY"; then
        WEBKNOCK=("$bin/webknock")
    else
        WEBKNOCK=("$CPY" -I -m webknock.client)
    fi
    mkdir -p -- "$CONF_DIR"
    [ "$mode" = 644 ] || chmod 0700 -- "$CONF_DIR"

    if [ "$kind" = keygen ]; then
        client_key "$ini"
        say "==> key of profile $profile: $KEY_FILE (0600, $KEY_STATE)"
        say "This client's public key:"
        say "    $PUBKEY"
        print_send "$SUGGESTED"
        say "\`webknockctl client add\` prints this client's profile; install it here with"
        say "    $PROG client --profile $profile --no-venv     (paste it, or --from FILE)"
        return 0
    fi

    out=$(pyrun "$CPY" "$PY_CLIENT_PROFILE" "$ini" "$CONF_DIR/$profile.keys" "$mode" "$url" "$kind" <"$blob") \
        || rc=$?
    [ "$rc" != 2 ] || exit 2
    [ "$rc" = 0 ] || die "the profile was not written (see above)"
    shown=$(sed -n 's/^url=//p' <<<"$out")
    # Remembered beside the profiles, so that a later uninstall --purge still finds them.
    client_list_add profile "$ini"
    if [ "$kind" = v1 ]; then
        say "==> profile $profile (protocol v1): $ini, keys $CONF_DIR/$profile.keys (0600)"
        say "    knock URL $shown"
    else
        client=$(sed -n 's/^client=//p' <<<"$out") instance=$(sed -n 's/^instance=//p' <<<"$out")
        kid=$(sed -n 's/^kid=//p' <<<"$out")
        client_key "$ini"
        say "==> profile $profile (protocol v2): $ini"
        say "    knock URL $shown"
        say "    private key $KEY_FILE (0600, $KEY_STATE)"
        say "This client's public key:"
        say "    $PUBKEY"
        if [ "$kid" = "$KID" ]; then
            say "The server's admin enrolled this very key (client $client of instance $instance,"
            say "key id $KID): nothing to send."
        elif [ -n "$kid" ]; then
            say "The profile is for another key (client $client, key id $kid), not this client's"
            say "(key id $KID): the server refuses its knocks until the admin enrols this one."
            print_send "$client" remove
        else
            print_send "${client:-$SUGGESTED}"
            say "(nothing to send if the admin enrolled this very key already)"
        fi
    fi
    say "Try: $bin/webknock --profile $profile info     then: webknock --profile $profile knock"
    [[ :$PATH: == *":$bin:"* ]] || say "(add $bin to your PATH)"
}

# -- uninstall -----------------------------------------------------------------------------

remove_spool() { # remove_spool DIR: only the layout webknockd made, then the dir if empty
    local dir=$1 sub
    [[ $dir =~ $PATH_RE ]] && [ "$dir" != / ] && [ -d "$dir" ] || return 0
    # results, seen: made by earlier versions (webknock.spool.mount.RETIRED)
    for sub in requests claimed rejected seen waits results; do
        rm -rf --one-file-system -- "${dir:?}/$sub"
    done
    # Its own tmpfs (webknockctl prepare-spool): unmount it, once emptied above.
    if mountpoint -q -- "$dir" 2>/dev/null; then
        umount -l -- "$dir" || warn "cannot unmount the spool's tmpfs $dir"
    fi
    rmdir -- "$dir" 2>/dev/null || warn "kept $dir: it holds files webknock did not make"
}

uninstall_instance() {
    local inst=$1 spool="" state="" audit="" c kept=() held=()
    instance_paths "$inst"
    local server_key=$ETC/$inst.server-key clients=$ETC/$inst.clients
    if [ ! -f "$MANIFEST" ] && [ ! -f "$CONFIG" ]; then
        say "instance $inst: not installed"
        return 0
    fi
    step "removing instance $inst"
    if [ -f "$CONFIG" ] && [ -x "$PY" ] && load_config_quiet "$CONFIG"; then
        spool=${CFG[spool_dir]} state=${CFG[state_file]} audit=${CFG[audit_log]}
        server_key=${CFG[server_key_file]} clients=${CFG[clients_dir]}
    elif [ -f "$CONFIG" ]; then # the venv is gone already (an earlier uninstall)
        spool=$(ini_value "$CONFIG" spool_dir) state=$(ini_value "$CONFIG" state_file)
        audit=$(ini_value "$CONFIG" audit_log)
    fi
    if [ -z "$ROOT" ]; then
        if [ -d /run/systemd/system ] && { systemctl -q is-enabled "$UNIT_NAME" 2>/dev/null \
            || systemctl -q is-active "$UNIT_NAME"; }; then
            say "    stopping $UNIT_NAME"
            systemctl disable -q --now "$UNIT_NAME"
        fi
        stop_direct_daemon
        if [ -f "$CONFIG" ] && [ -x "$SBIN/webknockctl" ]; then
            say "    removing the firewall chain/table (webknockctl teardown)"
            "$SBIN/webknockctl" --config "$CONFIG" teardown | indent \
                || die "webknockctl teardown failed; fix the error above and re-run uninstall"
        elif [ -f "$CONFIG" ]; then
            warn "$SBIN/webknockctl is gone: remove the firewall objects of $inst by hand"
        fi
    fi
    cron_update remove "$CONFIG"
    while IFS= read -r c; do
        [ -n "$c" ] || continue
        if is_our_shim "$c" "$PY"; then
            rm -f -- "$c"
        elif [ -e "$c" ]; then
            warn "kept $c: not the CGI install.sh wrote"
        fi
    done < <(manifest_get "$MANIFEST" cgi_copy)
    while IFS= read -r c; do
        [ -n "$c" ] && [ -e "$c" ] || continue
        # Never leave the web server broken: a snippet its config still includes stays,
        # with the line to remove first.
        local users
        users=$(grep -rnF -- "${c#"$ROOT"}" "$ROOT/etc/nginx" "$ROOT/etc/apache2" 2>/dev/null \
            | grep -v '^[^:]*:[0-9]*:[[:space:]]*#' || true)
        if [ -n "$users" ]; then
            warn "kept $c: the web server still includes it; remove this line, reload the web server, then run uninstall again:"
            printf '%s\n' "$users" | sed 's/^/        /' >&2
            held+=("$c")
            continue
        fi
        rm -f -- "$c"
    done < <(manifest_get "$MANIFEST" snippet)
    [ -z "$spool" ] || remove_spool "$spool"
    rm -f -- "$PIDFILE"
    if [ "$PURGE" = 1 ]; then
        rm -f -- "$CONFIG" "$KEYS" "$server_key" "$DAEMON_LOG"
        if [[ $clients =~ $PATH_RE ]] && [ -d "$clients" ]; then
            rm -rf --one-file-system -- "$clients"
        fi
        if [ -n "$state" ]; then
            for c in "" -journal -wal -shm .lock .daemon .metrics.json; do  # state.STATE_FILE_SUFFIXES
                rm -f -- "$state$c"
            done
        fi
        [ -z "$audit" ] || rm -f -- "$audit"
        say "    purged config, keys, state and log"
    else
        for c in "$CONFIG" "$KEYS" "$server_key" "$clients" "$state" "$DAEMON_LOG"; do
            [ -n "$c" ] && [ -e "$c" ] && kept+=("$c")
        done
        [ ${#kept[@]} -eq 0 ] || say "    kept ${kept[*]} (--purge deletes them)"
    fi
    if [ ${#held[@]} -eq 0 ]; then
        rm -f -- "$MANIFEST"
    else  # remembered, so that the next uninstall removes the snippet
        say "    kept its record $MANIFEST until the web server no longer includes ${held[*]}"
    fi
    if [ "$PURGE" = 1 ]; then
        for c in "$STATE_DIR" "$LOG_DIR" "$ETC"; do
            rmdir -- "$c" 2>/dev/null || true
        done
    fi
}

load_config_quiet() {
    local out line
    out=$(pyrun "$PY" "$PY_CONFIG" "$1" 2>/dev/null) || return 1
    CFG=()
    while IFS= read -r line; do
        CFG[${line%%=*}]=${line#*=}
    done <<<"$out"
}

remove_shared() {
    local f
    step "no instance left: removing the shared parts"
    for f in "$SBIN/webknockd" "$SBIN/webknockctl"; do
        if is_our_shim "$f" "$PY"; then
            rm -f -- "$f"
        elif [ -e "$f" ]; then
            warn "kept $f: not the entry point install.sh wrote"
        fi
    done
    if [ -f "$UNIT" ]; then
        rm -f -- "$UNIT"
        if systemd_running; then systemctl daemon-reload; fi
    fi
    cron_update remove /nonexistent
    rm -f -- "$LOGROTATE"
    rm -rf --one-file-system -- "$OPT"
    for f in "$SPOOL_BASE" "$STATE_DIR" "$LOG_DIR" "$ETC"; do  # SPOOL_BASE is RUN_DIR
        rmdir -- "$f" 2>/dev/null || true
    done
    for f in "$STATE_DIR" "$ETC" "$LOG_DIR"; do
        [ -d "$f" ] || continue
        if [ "$PURGE" = 1 ]; then
            say "    kept $f: it holds files webknock did not make"
        else
            say "    kept $f (--purge empties it)"
        fi
    done
}

uninstall_client() {
    local home bin conf_dir p kind
    if [ "$(id -u)" = 0 ]; then
        home=$ROOT/opt/webknock-client bin=$ROOT/usr/local/bin conf_dir=$ROOT/etc/webknock/client.d
    else
        home=$HOME/.local/share/webknock-client bin=$HOME/.local/bin conf_dir=$HOME/.config/webknock
    fi
    step "removing the client ($home)"
    if is_our_shim "$bin/webknock" "$home/venv/bin/python3"; then
        rm -f -- "$bin/webknock"
    fi
    if [ "$PURGE" = 1 ]; then
        while IFS= read -r p; do
            [ -n "$p" ] || continue
            rm -f -- "$p" "${p%.ini}.keys"
        done < <(manifest_get "$conf_dir/$CLIENT_LIST" profile)
        while IFS= read -r p; do # the v2 private keys webknock keygen made for install.sh
            [ -z "$p" ] || rm -f -- "$p"
        done < <(manifest_get "$conf_dir/$CLIENT_LIST" key)
        rm -f -- "$conf_dir/$CLIENT_LIST"
        rmdir -- "$conf_dir" 2>/dev/null || true
        say "    purged the profiles and keys install.sh client wrote"
    else
        for kind in profile key; do
            manifest_get "$conf_dir/$CLIENT_LIST" "$kind" | sed 's/^/    kept (--purge deletes it) /'
        done
    fi
    rm -rf --one-file-system -- "$home"
    [ "$(id -u)" != 0 ] || rmdir -- "$ROOT/etc/webknock" 2>/dev/null || true
}

cmd_uninstall() {
    local inst=webknock all=0 client=0 m left
    ROOT="" PURGE=0 YES=0
    while [ $# -gt 0 ]; do
        case $1 in
            --instance) inst=${2?--instance needs a value}; shift ;;
            --all) all=1 ;;
            --purge) PURGE=1 ;;
            --client) client=1 ;;
            --root) ROOT=${2?--root needs a value}; shift ;;
            -y | --yes) YES=1 ;;
            -h | --help) help_uninstall; exit 0 ;;
            *) usage_error "uninstall: unknown option $1" ;;
        esac
        shift
    done
    check_root_dir
    if [ "$client" = 1 ]; then
        uninstall_client
        return 0
    fi
    need_root uninstall
    [[ $inst =~ $NAME_RE ]] || usage_error "--instance: $inst is not an instance name"
    set_paths
    if [ "$all" = 1 ]; then
        for m in "$MANIFESTS"/*; do
            [ -f "$m" ] || continue
            uninstall_instance "$(basename -- "$m")"
        done
    else
        uninstall_instance "$inst"
    fi
    left=$(find "$MANIFESTS" -mindepth 1 -maxdepth 1 -type f -printf '%f ' 2>/dev/null || true)
    if [ -n "$left" ]; then
        say "instances still installed: $left(shared parts kept)"
    elif [ -d "$OPT" ] || [ -e "$UNIT" ] || [ -e "$SBIN/webknockd" ]; then
        remove_shared
    fi
    say "Done."
}

# -- main ----------------------------------------------------------------------------------

main() {
    local cmd=${1:-}
    [ $# -eq 0 ] || shift
    [ "$cmd" = demo ] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/webknock-install.XXXXXX")
    case $cmd in
        server) cmd_server "$@" ;;
        client) cmd_client "$@" ;;
        profile) cmd_profile "$@" ;;
        uninstall) cmd_uninstall "$@" ;;
        demo) exec "$SRC/demo" "$@" ;;
        -h | --help | help) help_main ;;
        "") help_main >&2; exit 2 ;;
        *) usage_error "unknown command $cmd" ;;
    esac
}

main "$@"
