"""Tests of ``flwr_gkt.flower``: strategies and node handlers, driven in process."""
