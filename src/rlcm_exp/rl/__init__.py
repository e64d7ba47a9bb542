"""Pure tensor code of the policy-gradient update: no models, no I/O, hand-checked in tests."""
