"""The project itself: docs true to the code, code shape, layers, public API, this tree."""
