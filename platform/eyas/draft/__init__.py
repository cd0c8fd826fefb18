"""The EAGLE-3 draft head, its vocabulary mapping and training-time test."""
