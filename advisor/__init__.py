"""The fine-tuning advisor: decide, estimate, calibrate, execute."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes looks for optional CPU kernels fetched from the Hub at run time and logs a warning when they are
# absent (always, offline); 4-bit still works through its fallback path, so the warning is only noise here.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
