"""Memory, time and cost estimates: exact (simulated) and fast (closed form, calibrated)."""
