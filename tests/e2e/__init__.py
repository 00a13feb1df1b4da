"""End to end: real Flower processes, deployments, the examples as a user runs them."""
