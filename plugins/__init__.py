"""Custom ops for beam drafting and packed verification."""
