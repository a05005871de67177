"""Benchmarks of fastbroker's cores (see README.md). A package, so that its conftest is
imported as bench.conftest and never shadows tests/conftest.py (which tests import
as `conftest`) when both directories are collected in one run."""
