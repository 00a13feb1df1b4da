"""Tests of ``flwr_gkt.app`` and ``flwr_gkt.config``: apps, runs, experiments, resume."""
