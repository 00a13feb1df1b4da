"""Tests of ``flwr_gkt.wire``: the wire format and the reply gate, against hostile nodes."""
