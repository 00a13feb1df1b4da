"""The plain-PyTorch core of flwr-gkt.

Models, losses, the training loop, the server and its feature store, the
baselines' and FedAgg's training math.

Nothing here imports Flower (``tests/project/test_layers.py`` checks it): the
algorithm can be read, run and tested without a federation.
"""
