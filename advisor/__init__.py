"""The fine-tuning advisor: decide, estimate, calibrate, execute."""

__version__ = "0.1.0"
