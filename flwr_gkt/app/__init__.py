"""Flower app running FedGKT: ServerApp, ClientApp, YAML presets and a Python entry."""
