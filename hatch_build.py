"""Hatch build hook: put the top-level backends/, calibration/ and cli.py inside qtool/.

The map (source -> path in the wheel) is the hook's ``namespaced`` option in pyproject.toml.
Only for regular wheels: an editable install leaves the files where they are and qtool's
``__init__`` finds them in the checkout (see the comment there).
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class NamespaceHook(BuildHookInterface):
    """Map the design card's top-level folders under the qtool package."""

    def initialize(self, version: str, build_data: dict) -> None:
        """Add the force-includes for regular wheels; editable wheels keep the checkout."""
        if version == "editable":
            return
        namespaced = self.config.get("namespaced")
        if not namespaced:
            raise ValueError("pyproject.toml: the custom wheel hook needs its `namespaced` map")
        build_data["force_include"].update(namespaced)
