"""relicv2: the RELICv2 self-supervised learning method, end to end, as command-line stages."""

__version__ = "0.1.0"
