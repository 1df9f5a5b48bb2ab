"""Training the Siamese network: config, network, pairs, data, training loop, evaluation."""
