"""Hatch build hook: put the top-level backends/, calibration/ and cli.py inside qtool/.

Only for regular wheels. An editable install leaves them where they are and qtool's
``__init__`` finds them in the checkout (see the comment there).
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

NAMESPACED = {
    "backends": "qtool/backends",
    "calibration": "qtool/calibration",
    "cli.py": "qtool/cli.py",
}


class NamespaceHook(BuildHookInterface):
    """Map the design card's top-level folders under the qtool package."""

    def initialize(self, version: str, build_data: dict) -> None:
        """Add the force-includes for regular wheels; editable wheels keep the checkout."""
        if version == "editable":
            return
        build_data["force_include"].update(NAMESPACED)
