"""The Flower app of this repository (``flwr run .``), and ``python -m simulation``.

A thin shim, not installed by the wheel: the app's code (ServerApps,
ClientApps, presets, experiments, the runtimes) is the package
:mod:`flwr_gkt.app`, which the wheel installs. ``pyproject.toml`` names this
package's ``server_app:app`` and ``client_app:app`` as the app's components.
"""
