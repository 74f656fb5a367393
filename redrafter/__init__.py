"""ReDrafter speculative decoding: engine builder and runtime."""
