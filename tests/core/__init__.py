"""Tests of ``flwr_gkt.core``: models, losses, training, the server and its feature store."""
