"""Finding profiles by name: NAME is ``~/.config/webknock/NAME.ini``, else
``/etc/webknock/client.d/NAME.ini``; a profile group (NAME.ini whose only section is
``[group]``, with ``profiles = a, b, c``) and ``--profile a,b,c`` name several at once."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from webknock.client.errors import ConfigError
from webknock.ini import read_ini

SYSTEM_DIR = Path("/etc/webknock/client.d")
GROUP_SECTION = "group"  # a profile group: NAME.ini with only [group] profiles = a, b, c
MAX_GROUP = 64
#: Profile names (the installer checks --profile with it too).
PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def user_dir(env: Mapping[str, str]) -> Path:
    config_home = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")) / ".config")
    return Path(config_home).expanduser() / "webknock"


def check_name(name: str) -> str:
    if not PROFILE_NAME.fullmatch(name):
        raise ConfigError(f"profile name {name!r}: use letters, digits, _ or -")
    return name


def profile_candidates(name: str, env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where profile NAME is looked for, in order."""
    return [user_dir(env) / f"{check_name(name)}.ini", SYSTEM_DIR / f"{name}.ini"]


def profile_dir(uid: int, env: Mapping[str, str]) -> Path:
    """Where new profiles go (`install.sh client`, `webknock keygen`): `SYSTEM_DIR` for
    root, the user's `~/.config/webknock` otherwise."""
    return SYSTEM_DIR if uid == 0 else user_dir(env)


def new_profile_path(name: str) -> Path:
    """Where profile NAME goes when there is none yet (:func:`profile_dir`)."""
    return profile_dir(os.geteuid(), os.environ) / f"{check_name(name)}.ini"


def find_profile(name: str, env: Mapping[str, str] = os.environ) -> Path:
    """`~/.config/webknock/NAME.ini`, else `/etc/webknock/client.d/NAME.ini`."""
    candidates = profile_candidates(name, env)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"profile {name!r} not found (looked for {' and '.join(map(str, candidates))}); "
        "write one with install.sh client, or pass --config FILE"
    )


def group_members(path: Path) -> list[str] | None:
    """The member names of a profile group file (its only section is `[group]`, with
    `profiles = a, b, c`), or None when `path` is not a group."""
    parser = read_ini(path, ConfigError)
    if not parser.has_section(GROUP_SECTION):
        return None
    if parser.sections() != [GROUP_SECTION]:
        raise ConfigError(f"{path}: a profile group has the section [group] and no other")
    values = dict(parser.items(GROUP_SECTION))
    unknown = sorted(set(values) - {"profiles"})
    if unknown:
        raise ConfigError(f"{path}: [group] {unknown[0]}: unknown key (known: profiles)")
    names: list[str] = []
    for item in (part.strip() for part in values.get("profiles", "").split(",")):
        if not item:
            continue
        if not PROFILE_NAME.fullmatch(item):
            raise ConfigError(
                f"{path}: [group] profiles: {item!r} is not a profile name "
                "(letters, digits, _ or -)"
            )
        if item not in names:
            names.append(item)
    if not names:
        raise ConfigError(f"{path}: [group] profiles: missing (e.g. profiles = office, lab)")
    if len(names) > MAX_GROUP:
        raise ConfigError(f"{path}: [group] profiles: more than {MAX_GROUP} profiles")
    return names


def expand_group(path: Path, env: Mapping[str, str] = os.environ) -> list[tuple[str, Path]]:
    """The (name, path) of each member of the group file `path`; a member that is missing or
    is itself a group (groups do not nest, so they cannot loop) is an error naming both."""
    members = group_members(path)
    if members is None:
        raise ConfigError(f"{path}: not a profile group (no [group] section)")
    found: list[tuple[str, Path]] = []
    for name in members:
        try:
            member = find_profile(name, env)
        except ConfigError as exc:
            raise ConfigError(f"{path}: [group] profiles: {exc.message}") from None
        if member.resolve() == path.resolve():
            raise ConfigError(f"{path}: [group] profiles: {name!r} is this group itself (a cycle)")
        if group_members(member) is not None:
            raise ConfigError(
                f"{path}: [group] profiles: {name!r} is a group too ({member}); "
                "groups do not nest: list its profiles instead"
            )
        found.append((name, member))
    return found


def expand_profiles(
    spec: str, env: Mapping[str, str] = os.environ
) -> tuple[list[tuple[str, Path]], bool]:
    """`--profile` NAME or `a,b,c` (each a profile or a group) as (name, path) pairs, each
    profile once, and whether this is a fan-out (several names, or a group)."""
    names = [part.strip() for part in spec.split(",")]
    if any(not name for name in names):
        raise ConfigError(f"--profile {spec!r}: an empty name (use a,b,c)")
    fan_out = len(names) > 1
    found: list[tuple[str, Path]] = []
    for name in names:
        path = find_profile(name, env)
        if group_members(path) is None:
            members = [(name, path)]
        else:
            members, fan_out = expand_group(path, env), True
        found.extend(m for m in members if m[0] not in [f[0] for f in found])
    if len(found) > MAX_GROUP:
        raise ConfigError(f"--profile {spec!r}: more than {MAX_GROUP} profiles")
    return found, fan_out
