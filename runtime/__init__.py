"""Runtime: base model, draft head, beam drafting, packed verification and the decode loop."""
