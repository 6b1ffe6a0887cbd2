"""The export tests' shared fixtures (helpers live in export_helpers.py: test modules import them
from there, since every test directory's conftest is named ``conftest``)."""

from export_helpers import minilm  # noqa: F401 (fixture)
