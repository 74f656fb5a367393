"""Engine builder."""
