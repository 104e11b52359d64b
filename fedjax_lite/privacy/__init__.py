"""Privacy: noise mechanisms (used by the DP aggregators) and, on ``dp_accounting``, privacy accounting."""

from fedjax_lite.privacy.mechanisms import add_gaussian_noise, gaussian_noise

__all__ = ["add_gaussian_noise", "gaussian_noise"]
