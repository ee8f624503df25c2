"""The help texts of install.sh and its commands (``install.sh [COMMAND] --help``)."""

from __future__ import annotations

MAIN = r"""Usage: install.sh COMMAND [OPTIONS]

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
"""

SERVER = r"""Usage: install.sh server [OPTIONS]

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
"""

CLIENT = r"""Usage: install.sh client [OPTIONS]
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
"""

PROFILE = r"""Usage: install.sh profile [--instance NAME] [--url URL] [--root DIR]

Print the v1 client profile of an installed server instance again: knock URL,
ports, time and the shared secret keys (an instance with v1 on: installed with
--v1). Paste it into `install.sh client` on a client, over a private channel
only. v2 clients get their profile from `webknockctl client add`.
"""

UNINSTALL = r"""Usage: install.sh uninstall [--instance NAME | --all] [--purge] [--root DIR]
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
                    install.sh client wrote, and the client's cache)
  --root DIR        remove an installation made with --root DIR (nothing is
                    stopped, the firewall is not touched)
  -y, --yes         do not ask
  -h, --help        this text
"""
