"""deepscope: train a neural network while looking inside it."""
__version__ = "0.1.0"
