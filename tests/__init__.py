"""The test suite (a package, so that test files import tests.support and the helper modules)."""
