"""eyas: train EAGLE-3 draft heads on your own compliant data with Ray, serve them, prove the gain."""

__version__ = "0.1.0"
