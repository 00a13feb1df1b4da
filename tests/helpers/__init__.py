"""Shared test helpers (no tests): in-process federations, tiny strategies, data files."""
