"""Shared ground of every stage: errors, atomic writes, devices and precision, the process group (torchrun), the version."""
