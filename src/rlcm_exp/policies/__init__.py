"""Samplers as Gaussian policies: one file per sampler (lcm.py, ddim.py), no shared base class.

base.py declares the interface (`Policy`, a Protocol) that the trainer, the evaluation and the
benchmarks use; _sd.py holds what both samplers share (prompt encoding, random draws, decoding);
members.py says which model-family member a sampler config drives; trajectory.py is the rollout
record.
"""
