"""``install.sh server``: install or update one server instance, step by step.

Re-runs keep keys and config (differing options are reported), update the code and
restart webknockd; secrets are printed only when made, or with --v1 (the v1 profile).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Mapping
from pathlib import Path

from webknock.config import ConfigError, ServerConfig, load
from webknock.install import apt, service, webserver
from webknock.install.console import PROG, InstallError, UsageError
from webknock.install.files import install_file, install_shim, is_our_shim
from webknock.install.host import Host
from webknock.install.manifest import Manifest, read_manifest, write_manifest
from webknock.install.paths import DEFAULT_INSTANCE, InstanceLayout, ServerLayout
from webknock.install.serverconf import (
    NewConfig,
    enable_v1,
    load_config,
    report_differences,
    write_config,
)
from webknock.install.serverkeys import ensure_server_key, write_v1_keys
from webknock.install.serveropts import ServerOptions, ask_settings, default_url_path
from webknock.install.v1profile import v1_profile
from webknock.install.venv import SERVER_EXTRA, activate, build_venv


def install_entry_points(host: Host, layout: ServerLayout) -> None:
    """The CGI, webknockd and webknockctl running the venv's python; the shipped examples."""
    for folder in (layout.cgi.parent, layout.sbin, layout.share):
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    src = host.src
    install_shim(src / "cgi-bin/webknock.cgi", layout.cgi, layout.python)
    install_shim(src / "sbin/webknockd", layout.sbin / "webknockd", layout.python)
    install_shim(src / "sbin/webknockctl", layout.sbin / "webknockctl", layout.python)
    for shipped, name in (
        ("etc/webknock/webknock.ini.example", "webknock.ini.example"),
        ("etc/nginx/webknock.conf", "nginx-webknock.conf"),
        ("etc/apache2/webknock.conf", "apache-webknock.conf"),
    ):
        install_file(src / shipped, layout.share / name, 0o644)


def prepare_log_dir(layout: ServerLayout) -> None:
    """/var/log/webknock: root:adm 0750 (the audit trails are readable by group adm)."""
    layout.log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        adm = grp.getgrnam("adm").gr_gid
    except KeyError:
        adm = 0
    os.chown(layout.log_dir, 0, adm)
    os.chmod(layout.log_dir, 0o750)  # noqa: S103 (group adm reads the audit trails)


def install_spool(host: Host, cfg: ServerConfig, gid: int, *, mount: bool) -> None:
    """The spool exactly as webknockd lays it out, on its own tmpfs with `mount`."""
    from webknock.spool.mount import mount_spool, prepare_spool

    if mount and not mount_spool(cfg.spool, gid):
        host.console.err.write(f"warning: {cfg.spool.root} is not on a tmpfs of its own\n")
    prepare_spool(cfg.spool, gid)


def check_installation(host: Host, layout: ServerLayout, config: Path) -> None:
    """``webknockctl check-config``; errors end the run (only warned about under --root)."""
    ctl = str(layout.sbin / "webknockctl")
    proc = host.runner.run([ctl, "--config", str(config), "check-config"])
    out = proc.stdout.rstrip("\n")
    if proc.returncode == 0:
        host.console.say(f"    {out}")
        return
    if proc.returncode == 3:  # warnings only
        # Before webknockd's first start its state file does not exist: expected.
        lines = [
            ln for ln in out.splitlines() if not re.search(r"state file .* does not exist yet", ln)
        ]
        if lines:
            host.console.indented("\n".join(lines))
        else:
            host.console.say("    OK (the state file appears when webknockd first runs)")
        return
    host.console.indented(out if proc.returncode == 1 else proc.stderr, err=True)
    if not layout.root:
        raise InstallError("webknockctl check-config found errors (above)")
    host.console.warn("check-config found errors (above); continuing (--root)")


def ssh_session(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """(client address, server port) of the SSH session running the installer, if any."""
    client = environ.get("SSH_CLIENT", "").split()  # client-ip client-port server-port
    if client:
        return (client[0], int(client[2])) if len(client) >= 3 and client[2].isdigit() else None
    conn = environ.get("SSH_CONNECTION", "").split()  # client-ip client-port server-ip port
    if len(conn) >= 4 and conn[3].isdigit():
        return conn[0], int(conn[3])
    return None


def protect_admin_session(host: Host, layout: ServerLayout, cfg: ServerConfig) -> None:
    """protect = yes: grant the admin's SSH session address first, so it is never cut off."""
    say, ports = host.console.say, ", ".join(map(str, sorted(cfg.tcp_ports)))
    session = ssh_session(host.environ)
    if session is None:
        say("protect = yes: no SSH session found ($SSH_CLIENT is unset; sudo drops it unless")
        say("    run as sudo --preserve-env=SSH_CLIENT). Knock before opening new connections to")
        say(f"    {ports}; established connections never drop.")
        return
    ip, port = session
    if port not in cfg.tcp_ports:
        say(f"protect = yes: your SSH port {port} is not offered, so protect does not close it.")
        return
    host.console.step("protect = yes: granting your SSH session's address first")
    ctl = str(layout.sbin / "webknockctl")
    proc = host.runner.run([ctl, "--config", str(cfg.source), "grant", ip, "--port", str(port)])
    host.console.indented(proc.stdout)
    if proc.returncode != 0:
        host.console.indented(proc.stderr, err=True)
        raise InstallError(
            f"could not grant {ip} tcp/{port}; not starting webknockd (fix and re-run)"
        )
    say(f"    {ip} may open new connections to tcp/{port} for {cfg.max_time} s (from $SSH_CLIENT);")
    say("    established connections never drop. Knock with a client before it runs out.")


def print_enrol_instructions(host: Host, layout: ServerLayout, inst: InstanceLayout) -> None:
    ctl = f"{layout.sbin}/webknockctl" if layout.root else "webknockctl"
    if layout.root or inst.name != DEFAULT_INSTANCE:
        ctl = f"{ctl} --config {inst.config}"
    for line in (
        "Enrol clients (protocol v2: one key per client; no secret leaves either side):",
        "  1. on the client: install.sh client --profile NAME --keygen-only",
        "     (or, with the client installed: webknock --profile NAME keygen)",
        "     prints its public key line wk2:... and the command to send you",
        f"  2. here: {ctl} client add NAME --key 'wk2:...' [--ports tcp/22]",
        "     [--max-time S] [--from NETWORKS] [--expires YYYY-MM-DD] prints the client's",
        "     profile (url, server_key, ports): send it back to the client",
        "  3. on the client: install.sh client --profile NAME, and paste it (or --from",
        "     FILE); then: webknock --profile NAME knock",
        f"  Later: {ctl} client list | disable NAME | remove NAME --revoke",
    ):
        host.console.say(line)


def _backend_guess(opts: ServerOptions, config: Path) -> str:
    if not config.exists():
        return opts.backend or "auto"
    try:
        return load(config).backend
    except ConfigError:
        return "auto"


def install_server(host: Host, opts: ServerOptions, work: Path) -> None:
    """The whole of ``install.sh server`` (options already checked by :func:`validate`)."""
    say, step = host.console.say, host.console.step
    layout = ServerLayout(opts.root)
    inst = layout.instance(opts.instance)
    if not (host.src / "pyproject.toml").is_file() or not (host.src / "webknock").is_dir():
        raise InstallError(f"{host.src} is not a webknock source tree")
    config_exists = inst.config.exists()
    cgi_copy: Path | None = None
    if opts.cgi_dir:
        name = "webknock.cgi" if inst.name == DEFAULT_INSTANCE else f"webknock-{inst.name}.cgi"
        cgi_copy = Path(opts.root + opts.cgi_dir.rstrip("/")) / name
    # A re-run remembers the URL and web server of the first run.
    remembered = read_manifest(inst.manifest, inst.name)
    opts.url = opts.url or remembered.url
    opts.web_server = opts.web_server or remembered.web_server
    copy_name = cgi_copy.name if cgi_copy else None
    ask_settings(host, opts, config_exists=config_exists, cgi_copy_name=copy_name)
    web_server = opts.web_server or webserver.default_web_server(host)
    url = opts.url or f"https://{host.fqdn()}{default_url_path(opts, copy_name)}"

    if not layout.root:
        packages = apt.server_packages(host, _backend_guess(opts, inst.config), web_server)
        apt.apt_install(host, packages, no_apt=opts.no_apt)
    build_venv(host, layout.venv, SERVER_EXTRA, work)
    activate(layout.venv)

    step("installing entry points")
    install_entry_points(host, layout)
    layout.etc.mkdir(mode=0o755, parents=True, exist_ok=True)
    layout.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(layout.etc, 0o755)  # noqa: S103 (configs are public; keys are 0600)
    os.chmod(layout.state_dir, 0o700)
    # Record the instance before creating its files, so an interrupted run can be uninstalled.
    manifest = Manifest(inst.name, str(inst.config), url, web_server)
    write_manifest(inst.manifest, manifest)

    # Protocol v1 (the shared keys): on for a new instance only with --v1; an instance that
    # has it keeps it (never turned off here); --v1 adds it to one that has not.
    v1_on, v1_added, keys = opts.v1, False, inst.keys
    if config_exists:
        kept = load_config(inst.config)
        given = {
            key: (flag, value)
            for key, flag, value, is_given in (
                ("tcp_ports", "--tcp-ports", opts.tcp_ports or "", opts.tcp_ports is not None),
                ("udp_ports", "--udp-ports", opts.udp_ports or "", opts.udp_ports is not None),
                ("max_time", "--max-time", opts.max_time, bool(opts.max_time)),
                ("backend", "--backend", opts.backend, bool(opts.backend)),
                ("protect", "--protect", opts.protect, bool(opts.protect)),
                ("web_user", "--web-user", opts.web_user, bool(opts.web_user)),
            )
            if is_given
        }
        report_differences(host.console, kept, given, opts.url if opts.url_given else None)
        web_user = kept.web_user
        if kept.keys_file is not None:
            keys, v1_on = kept.keys_file, True
        elif opts.v1:
            v1_added = True
        new = None
    else:
        tcp = "22" if opts.tcp_ports is None else opts.tcp_ports
        udp = opts.udp_ports or ""
        if not tcp and not udp:
            raise UsageError("no ports: give --tcp-ports and/or --udp-ports")
        web_user = opts.web_user or "www-data"
        new = NewConfig(
            tcp, udp, opts.max_time or "3600", url, opts.backend or "auto", web_user,
            opts.protect or "no", keys if v1_on else None,
        )  # fmt: skip
    try:
        web_gid = pwd.getpwnam(web_user).pw_gid
    except KeyError:
        raise InstallError(f"web user {web_user} does not exist") from None
    web_group = grp.getgrgid(web_gid).gr_name

    step(f"keys and config in {layout.etc}")
    keys_status = ""
    if v1_on:
        if not keys.parent.is_dir():
            raise InstallError(f"the directory of keys_file {keys} does not exist")
        keys_status = write_v1_keys(keys)
    if new is not None and write_config(inst, new):
        config_status = "new"
    else:
        config_status = (
            f"kept (edit it to change settings; {layout.share}/webknock.ini.example lists them all)"
        )
    if v1_added:
        enable_v1(inst.config, keys)
        config_status = "kept, keys_file added (--v1)"
    cfg = load_config(inst.config)
    if v1_on:
        say(f"    {keys}: {keys_status}")
    # Protocol v2: the server's own signing key (0600 root), made once, kept after.
    key_state, public = ensure_server_key(cfg)
    say(f"    v2 server key: {key_state} (public {public})")
    say(f"    {inst.config}: {config_status}")
    if not v1_on:
        say("    protocol v1: off (no keys file; --v1 turns it on, for the original PHP clients)")
    elif v1_added or not config_exists:
        say(
            f"    protocol v1: on (keys_file {cfg.keys_file}; "
            "for the original PHP clients and v1 profiles)"
        )
    else:
        say(
            f"    protocol v1: on (kept: {inst.config} has keys_file {cfg.keys_file}; "
            "remove that line to turn it off)"
        )
    if not cfg.url:
        say(
            f"    (no url in {inst.config}: add url = {url} under [server] to have "
            "webknockctl client add print it)"
        )

    step(f"spool {cfg.spool_dir} (group {web_group}), state {cfg.state_file}")
    # Its own bounded tmpfs only on this host's real /run, not under --root.
    install_spool(host, cfg, web_gid, mount=not layout.root)

    if cgi_copy is not None:
        step(f"CGI copy {cgi_copy}")
        cgi_copy.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        install_shim(host.src / "cgi-bin/webknock.cgi", cgi_copy, layout.python, inst.config)
    for earlier in map(Path, remembered.cgi_copies):  # an upgrade's new CGI reaches them too
        if earlier != cgi_copy and is_our_shim(earlier, layout.python):
            step(f"CGI copy {earlier} (of an earlier run, brought up to date)")
            install_shim(host.src / "cgi-bin/webknock.cgi", earlier, layout.python, inst.config)
    snippet = webserver.write_snippet(
        host, web_server, inst, webserver.url_path(url), layout.cgi, url
    )
    manifest.snippets = [str(snippet)] if snippet else []
    manifest.cgi_copies = [str(cgi_copy)] if cgi_copy else []
    write_manifest(inst.manifest, manifest)

    step(
        f"cron fallback {layout.cron_file}, systemd unit {layout.unit}, "
        f"log rotation {layout.logrotate}"
    )
    service.cron_update(host, layout, inst.config, add=True)
    service.install_unit(host, layout)
    prepare_log_dir(layout)
    layout.logrotate.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    install_file(host.src / "etc/logrotate.d/webknock", layout.logrotate, 0o644)

    step("checking the installation (webknockctl check-config)")
    check_installation(host, layout, inst.config)

    if layout.root:
        say("==> --root: nothing started, firewall untouched")
    elif opts.no_start:
        say(f"==> --no-start: webknockd not started (systemctl enable --now {inst.unit_name})")
    else:
        if cfg.protect:
            protect_admin_session(host, layout, cfg)
        service.start_daemon(host, inst)

    say()
    webserver.print_web_instructions(host, web_server, snippet, cgi_copy, layout.cgi, inst, url)
    say()
    print_enrol_instructions(host, layout, inst)
    if v1_on:
        say()
        say("Protocol v1 is on (shared keys, for the original PHP clients and v1 profiles).")
        if keys_status.startswith("new") or opts.v1:  # made now, or asked for with --v1
            say("v1 client profile - on each v1 client run `install.sh client --profile NAME`")
            say("and paste this (or save it to a file for --from FILE). It holds the secret keys:")
            host.console.out.write(v1_profile(cfg, url))
        else:
            again = [PROG, "profile"]
            again += ["--instance", inst.name] if inst.name != DEFAULT_INSTANCE else []
            again += ["--root", layout.root] if layout.root else []
            say(f"Its client profile holds the secret keys: `{' '.join(again)}` prints it.")
    say()
    say(f"Done: instance {inst.name}. Status: webknockctl --config {inst.config} status")


def print_profile(host: Host, root: str, instance: str, url: str) -> None:
    """``install.sh profile``: the v1 profile of an installed instance, again."""
    layout = ServerLayout(root)
    inst = layout.instance(instance)
    if not os.access(layout.python, os.X_OK) or not inst.config.is_file():
        raise InstallError(f"instance {instance} is not installed (no {inst.config})")
    activate(layout.venv)
    url = url or read_manifest(inst.manifest, instance).url
    host.console.out.write(v1_profile(load_config(inst.config), url))
