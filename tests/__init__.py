"""The test suite: one package, so helpers are imported by their module path (tests.helpers.*)."""
