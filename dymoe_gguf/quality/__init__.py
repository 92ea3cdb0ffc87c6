"""Quality: evaluation against a reference (ppl, KL, top-1) and calibration profiles."""
