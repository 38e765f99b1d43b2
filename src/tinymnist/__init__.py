"""tinymnist: tiny CNNs that reach 99.4% on MNIST with fewer than 8,000 parameters."""

__version__ = "0.1.0"
