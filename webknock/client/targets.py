"""What a command knocks at: one profile's knockers (one per address family it asks for), or
the targets of a fan-out (--profile a,b,c, or a profile group), command-line overrides
applied to each profile."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from webknock.client.cache import Cache, cache_dir, cache_name
from webknock.client.knocker import Knocker
from webknock.client.lookup import expand_group, expand_profiles, find_profile, group_members
from webknock.client.net import Transport
from webknock.client.options import with_overrides
from webknock.client.profile import Profile, load_profile


def knockers_for(profile: Profile, *, use_cache: bool = True) -> list[Knocker]:
    """One knocker per address family the profile asks for."""
    keys = profile.credentials()
    families = ["ipv4", "ipv6"] if profile.family == "both" else [profile.family]
    knockers = []
    for family in families:
        transport = Transport(profile.url, family, profile.verify, profile.timeout)
        cache = Cache(cache_dir() / cache_name(profile.path, family)) if use_cache else None
        knockers.append(Knocker(profile, keys, transport, cache))
    return knockers


def profile_from(args: argparse.Namespace) -> Profile:
    """The one profile of --config or --profile, with command-line overrides applied."""
    if args.config is not None:
        profile = load_profile(args.config)
    else:
        profile = load_profile(find_profile(args.profile), args.profile)
    return with_overrides(profile, args)


@dataclass
class Target:
    """One server of a fan-out: its profile's name and that profile's knockers."""

    name: str
    knockers: list[Knocker]


def targets_from(args: argparse.Namespace) -> list[Target] | None:
    """The profiles of a fan-out (--profile a,b,c, or a group by --profile or --config),
    overrides applied; None for one plain profile. Any bad profile stops all (exit 2)."""
    if args.config is not None:
        if group_members(args.config) is None:
            return None
        pairs = expand_group(args.config)
    else:
        pairs, fan_out = expand_profiles(args.profile)
        if not fan_out:
            return None
    targets = []
    for name, path in pairs:
        profile = with_overrides(load_profile(path, name), args)
        targets.append(Target(name, knockers_for(profile, use_cache=not args.no_cache)))
    return targets
