"""Target features for EAGLE-3: aux hidden states (3 layers) + final hidden state per token."""
