"""The patch tests' shared fixtures (helpers live in patch_helpers.py: test modules import them from
there, since every test directory's conftest is named ``conftest``)."""

from patch_helpers import adapters, exported  # noqa: F401 (fixtures)
