"""The app's ServerApp component: :data:`flwr_gkt.app.server_app.app`."""

from flwr_gkt.app.server_app import app

__all__ = ["app"]
