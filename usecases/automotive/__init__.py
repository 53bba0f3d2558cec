"""Automotive use case: traffic-sign classification as a three-stage multi-exit network."""
