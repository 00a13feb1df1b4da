"""quickstart-fedgkt: a Flower app training FedGKT with the flwr-gkt plugin."""
