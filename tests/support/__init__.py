"""Test helpers: private server processes and a fault-injecting TCP proxy (see tests/conftest.py)."""
