"""Machine profiles (`--profile NAME`, `llmup profiles`): see loader.py."""

from launcher.profiles.compare import differences, mismatch_warning
from launcher.profiles.loader import Profile, all_profiles, find_profile, load_profile

__all__ = [
    "Profile",
    "all_profiles",
    "differences",
    "find_profile",
    "load_profile",
    "mismatch_warning",
]
