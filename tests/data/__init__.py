"""Tests of ``flwr_gkt.data``: dataset loaders, partitions, node data, own datasets."""
