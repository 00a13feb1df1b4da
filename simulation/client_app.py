"""The app's ClientApp component: :data:`flwr_gkt.app.client_app.app`."""

from flwr_gkt.app.client_app import app

__all__ = ["app"]
