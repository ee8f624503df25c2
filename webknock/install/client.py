"""``install.sh client`` and ``install.sh uninstall --client``: the client command, its
venv, one profile, and this client's v2 key (made by ``webknock keygen``, never replaced).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from webknock.client.cache import cache_dir, cache_files
from webknock.client.lookup import profile_dir
from webknock.install import apt
from webknock.install.clientprofile import profile_kind, read_profile_text, write_profile
from webknock.install.console import PROG, InstallError
from webknock.install.files import install_shim, is_our_shim, remove, rmdir_quiet, write_file
from webknock.install.host import Host
from webknock.install.paths import ClientLayout, client_layout
from webknock.install.venv import CLIENT_EXTRA, activate, build_venv


@dataclass
class ClientOptions:
    profile: str = "default"
    source: str = ""  # --from
    url: str = ""
    keygen_only: bool = False
    root: str = ""
    no_apt: bool = False
    no_venv: bool = False
    yes: bool = False


@dataclass(frozen=True)
class ClientKey:
    path: Path
    state: str  # "kept: it existed" or "new, made by webknock keygen"
    public: str  # the wk2:... line
    kid: str  # its key id, hex
    suggested: str  # the client name webknock keygen suggests to the admin


def layout_for(host: Host, root: str) -> ClientLayout:
    """Where the client goes, with the profile folder the client reads
    (:mod:`webknock.client.lookup`)."""
    home = Path(host.environ.get("HOME", "~")).expanduser()
    conf = profile_dir(host.uid, host.environ)
    return client_layout(root, host.uid, home, conf)


def record(layout: ClientLayout, kind: str, path: Path) -> None:
    """Remember a file install.sh client wrote (``profile=`` or ``key=``), for --purge."""
    lines = set()
    try:
        lines = {
            ln
            for ln in layout.list_file.read_text().splitlines()
            if ln.startswith(("profile=", "key="))
        }
    except FileNotFoundError:
        pass
    lines.add(f"{kind}={path}")
    write_file(layout.list_file, "\n".join(sorted(lines)) + "\n", 0o644)


def recorded(layout: ClientLayout, kind: str) -> list[str]:
    try:
        lines = layout.list_file.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [ln.split("=", 1)[1] for ln in lines if ln.startswith(f"{kind}=")]


def client_key(host: Host, layout: ClientLayout, ini: Path, command: list[str]) -> ClientKey:
    """This client's v2 key for profile `ini`: made by `webknock keygen` when there is none
    (and recorded), else read by `webknock pubkey`."""
    from webknock.client.keygen import client_name, key_path
    from webknock.protocol import v2

    path = key_path(ini)
    if path.exists() or path.is_symlink():
        proc = host.runner.run([*command, "--config", str(ini), "pubkey"])
        if proc.returncode != 0:
            host.console.err.write(proc.stderr)
            raise InstallError(
                f"cannot use this client's key {path} (see above): fix its mode or move it "
                "away, then re-run"
            )
        state = "kept: it existed"
    else:
        proc = host.runner.run([*command, "--config", str(ini), "keygen", "-q"])
        if proc.returncode != 0:
            host.console.err.write(proc.stderr)
            raise InstallError("webknock keygen failed (see above)")
        state = "new, made by webknock keygen"
        record(layout, "key", path)
    public = (proc.stdout.splitlines() or [""])[0]
    try:
        kid = v2.key_id(v2.parse_public_key(public)[0]).hex()
    except v2.V2Error:
        raise InstallError(f"webknock printed no usable public key: {public}") from None
    return ClientKey(path, state, public, kid, client_name())


def print_send(host: Host, name: str, public: str, *, remove_first: bool = False) -> None:
    say = host.console.say
    say("Send this to the server's admin, to run on the server:")
    if remove_first:
        add = f"webknockctl client add {name} --key '{public}'"
        say(f"    webknockctl client remove {name} && {add}")
        say(
            f"(with the --ports, --max-time, --from and --expires {name} had; "
            "the public key holds no secret)"
        )
    else:
        say(f"    webknockctl client add {name} --key '{public}'")
        say(
            "(the admin adds --ports, --max-time, --from, --expires as wanted "
            "and may choose another"
        )
        say(f"name than {name}; the public key holds no secret)")


def install_client(host: Host, opts: ClientOptions, work: Path) -> None:
    """The whole of ``install.sh client`` (options already checked)."""
    say = host.console.say
    # Read the profile first: a wrong paste should not cost a venv build.
    kind, text = "keygen", ""
    if not opts.keygen_only:
        text = read_profile_text(host, opts.source)
        kind = profile_kind(text, opts.url)

    layout = layout_for(host, opts.root)
    if not opts.no_venv:
        if host.uid == 0:
            apt.apt_install(host, list(apt.CLIENT_PACKAGES), no_apt=opts.no_apt or bool(opts.root))
        build_venv(host, layout.venv, CLIENT_EXTRA, work)
        layout.bin.mkdir(mode=0o755, parents=True, exist_ok=True)
        install_shim(host.src / "client/webknock", layout.command, layout.python)
    if not os.access(layout.python, os.X_OK):
        raise InstallError(f"the client is not installed ({layout.home}); run without --no-venv")
    activate(layout.venv)
    # The installed command; the venv's module where that is gone.
    if is_our_shim(layout.command, layout.python):
        command = [str(layout.command)]
    else:
        command = [str(layout.python), "-I", "-m", "webknock.client"]
    layout.conf_dir.mkdir(mode=0o755 if layout.system else 0o700, parents=True, exist_ok=True)
    if not layout.system:
        os.chmod(layout.conf_dir, 0o700)
    ini = layout.conf_dir / f"{opts.profile}.ini"

    if kind == "keygen":
        key = client_key(host, layout, ini, command)
        say(f"==> key of profile {opts.profile}: {key.path} (0600, {key.state})")
        say("This client's public key:")
        say(f"    {key.public}")
        print_send(host, key.suggested, key.public)
        say("`webknockctl client add` prints this client's profile; install it here with")
        say(f"    {PROG} client --profile {opts.profile} --no-venv     (paste it, or --from FILE)")
        return

    keys_file = layout.conf_dir / f"{opts.profile}.keys"
    written = write_profile(text, ini, keys_file, layout.profile_mode, opts.url, kind)
    # Remembered beside the profiles, so that a later uninstall --purge still finds them.
    record(layout, "profile", ini)
    if kind == "v1":
        say(f"==> profile {opts.profile} (protocol v1): {ini}, keys {keys_file} (0600)")
        say(f"    knock URL {written.url}")
    else:
        key = client_key(host, layout, ini, command)
        say(f"==> profile {opts.profile} (protocol v2): {ini}")
        say(f"    knock URL {written.url}")
        say(f"    private key {key.path} (0600, {key.state})")
        say("This client's public key:")
        say(f"    {key.public}")
        if written.kid == key.kid:
            say(
                f"The server's admin enrolled this very key (client {written.client} of instance "
                f"{written.instance},"
            )
            say(f"key id {key.kid}): nothing to send.")
        elif written.kid:
            say(
                f"The profile is for another key (client {written.client}, key id {written.kid}), "
                "not this client's"
            )
            say(
                f"(key id {key.kid}): the server refuses its knocks "
                "until the admin enrols this one."
            )
            print_send(host, written.client, key.public, remove_first=True)
        else:
            print_send(host, written.client or key.suggested, key.public)
            say("(nothing to send if the admin enrolled this very key already)")
    try_it = f"{layout.bin}/webknock --profile {opts.profile} info"
    say(f"Try: {try_it}     then: webknock --profile {opts.profile} knock")
    if str(layout.bin) not in host.environ.get("PATH", "").split(":"):
        say(f"(add {layout.bin} to your PATH)")


def remove_client(host: Host, root: str, *, purge: bool) -> None:
    """``install.sh uninstall --client``: the command and the venv; with `purge` also the
    profiles, v1 keys files and v2 private keys install.sh client wrote."""
    layout = layout_for(host, root)
    host.console.step(f"removing the client ({layout.home})")
    if is_our_shim(layout.command, layout.python):
        remove(layout.command)
    if purge:
        for profile in recorded(layout, "profile"):
            remove(Path(profile))
            remove(Path(profile).with_suffix(".keys"))
        for key in recorded(layout, "key"):  # the v2 private keys webknock keygen made
            remove(Path(key))
        remove(layout.list_file)
        rmdir_quiet(layout.conf_dir)
        cache = Path(root + str(cache_dir(host.environ, host.uid)))
        for entry in cache_files(cache):
            remove(entry)
        rmdir_quiet(cache)
        host.console.say("    purged the profiles and keys install.sh client wrote, and the cache")
    else:
        for kind in ("profile", "key"):
            for path in recorded(layout, kind):
                host.console.say(f"    kept (--purge deletes it) {path}")
    shutil.rmtree(layout.home, ignore_errors=True)
    if host.uid == 0:
        rmdir_quiet(Path(root + "/etc/webknock"))
