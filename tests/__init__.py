"""The test suite, one folder per layer of the package (``core``, ``data``, ``wire``, ...)."""
